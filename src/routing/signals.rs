//! Cheap signals of a request's difficulty, read from its text and shape in microseconds: how
//! long the new message is, whether it carries code or mathematics, how many steps and
//! constraints it asks for, whether it asks for analysis, whether it is one of the things a
//! small model does as well (a greeting, a translation, a spelling fix), and what the request
//! brings along (tools, tool results, earlier turns). Each signal is a number in `[0, 1]`.

use crate::domain::{Message, Role};

/// The parts of a request the classifier reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Subject {
    /// The newest user message's text (what is being asked now).
    pub question: String,
    /// The user message before it, if any (what the conversation is about).
    pub previous: Option<String>,
    /// Every earlier message's text, joined (code or mathematics in the context).
    pub context: String,
    /// Earlier messages (user, assistant and tool) before the question.
    pub earlier: usize,
    /// Tools the request offers.
    pub tools: usize,
    /// Tool results in the request: an agent's loop is under way.
    pub tool_results: usize,
}

impl Subject {
    /// Reads a request's messages (system messages aside) and its offered tools.
    pub fn of(messages: &[Message], tools: usize) -> Self {
        let turns: Vec<&Message> = messages.iter().filter(|m| m.role != Role::System).collect();
        let newest_user = turns.iter().rposition(|m| m.role == Role::User);
        let question = newest_user.map_or_else(String::new, |i| turns[i].content.text());
        let previous = newest_user.and_then(|i| {
            turns[..i]
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map(|m| m.content.text())
        });
        let before = newest_user.unwrap_or(turns.len());
        let mut context = String::new();
        for m in &turns[..before] {
            context.push_str(&m.content.text());
            context.push('\n');
        }
        Self {
            question,
            previous,
            context,
            earlier: before,
            tools,
            tool_results: turns.iter().filter(|m| m.role == Role::Tool).count(),
        }
    }
}

/// The signals of one text, each in `[0, 1]`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TextSignals {
    pub length: f32,
    pub code: f32,
    pub math: f32,
    pub steps: f32,
    pub analysis: f32,
    pub simple: f32,
}

const CODE_WORDS: &[&str] = &[
    "code",
    "function",
    "functions",
    "bug",
    "debug",
    "compile",
    "compiler",
    "exception",
    "stack",
    "trace",
    "traceback",
    "api",
    "async",
    "await",
    "thread",
    "threads",
    "mutex",
    "deadlock",
    "race",
    "refactor",
    "python",
    "rust",
    "javascript",
    "typescript",
    "java",
    "golang",
    "c++",
    "sql",
    "query",
    "regex",
    "algorithm",
    "complexity",
    "recursion",
    "recursive",
    "class",
    "struct",
    "library",
    "framework",
    "docker",
    "kubernetes",
    "git",
    "leak",
    "segfault",
    "database",
    "schema",
    "endpoint",
    "backend",
    "frontend",
    "react",
    "css",
    "html",
    "bash",
    "script",
    "lock",
    "concurrency",
    "concurrent",
    "cache",
    "latency",
    "memory",
    "implement",
    "implementation",
    "unit",
    "test",
    "tests",
    "benchmark",
    "parser",
    "compiler",
    "kotlin",
    "swift",
    "haskell",
    "scala",
    "node",
    "npm",
    "cargo",
    "pandas",
    "numpy",
];

const MATH_WORDS: &[&str] = &[
    "prove",
    "proof",
    "theorem",
    "lemma",
    "integral",
    "integrate",
    "derivative",
    "differentiate",
    "probability",
    "expected",
    "expectation",
    "variance",
    "matrix",
    "matrices",
    "eigenvalue",
    "eigenvalues",
    "equation",
    "equations",
    "optimize",
    "optimise",
    "maximize",
    "maximise",
    "minimize",
    "minimise",
    "limit",
    "series",
    "converge",
    "converges",
    "convergence",
    "combinatorics",
    "permutations",
    "combinations",
    "modulo",
    "primes",
    "induction",
    "polynomial",
    "logarithm",
    "geometric",
    "bayes",
    "bayesian",
    "distribution",
    "vector",
    "vectors",
    "calculus",
    "inequality",
    "irrational",
    "infinitely",
    "recurrence",
    "asymptotic",
    "dimension",
    "probabilities",
    "odds",
    "démontrer",
    "démontre",
    "intégrale",
    "beweise",
    "demuestra",
];

const SEQUENCERS: &[&str] = &[
    "then",
    "after",
    "afterwards",
    "finally",
    "first",
    "second",
    "third",
    "next",
    "step",
    "steps",
    "also",
    "additionally",
    "each",
    "every",
    "both",
    "and",
    "while",
    "plus",
];

const CONSTRAINTS: &[&str] = &[
    "must",
    "should",
    "without",
    "least",
    "most",
    "exactly",
    "ensure",
    "sure",
    "only",
    "avoid",
    "include",
    "including",
    "keep",
    "under",
    "within",
    "handle",
    "including",
    "constraint",
    "constraints",
    "requirement",
    "requirements",
    "edge",
];

const ANALYSIS_WORDS: &[&str] = &[
    "why",
    "explain",
    "compare",
    "comparison",
    "tradeoff",
    "tradeoffs",
    "trade",
    "pros",
    "cons",
    "analyze",
    "analyse",
    "analysis",
    "evaluate",
    "assess",
    "design",
    "architecture",
    "strategy",
    "plan",
    "argue",
    "critique",
    "review",
    "implications",
    "justify",
    "rigorous",
    "rigorously",
    "detailed",
    "thorough",
    "comprehensive",
    "optimal",
    "versus",
    "vs",
    "recommend",
    "approach",
    "scalable",
    "scale",
    "migrate",
    "migration",
    "root",
    "cause",
    "diagnose",
    "investigate",
    "weigh",
    "counterargument",
    "nuanced",
    "consequences",
    "subtle",
    "pourquoi",
    "analyse",
    "warum",
    "por",
    "qué",
];

const SIMPLE_WORDS: &[&str] = &[
    "translate",
    "translation",
    "traduis",
    "traduce",
    "traducir",
    "übersetze",
    "typo",
    "typos",
    "spelling",
    "grammar",
    "spell",
    "capital",
    "define",
    "definition",
    "meaning",
    "synonym",
    "synonyms",
    "antonym",
    "convert",
    "hello",
    "hi",
    "hey",
    "thanks",
    "thank",
    "bonjour",
    "hola",
    "hallo",
    "merci",
    "gracias",
    "danke",
    "ok",
    "okay",
    "shorter",
    "simpler",
    "uppercase",
    "lowercase",
    "capitalize",
    "reword",
    "rephrase",
    "abbreviation",
    "stand",
    "acronym",
    "weather",
    "time",
    "date",
    "cool",
    "great",
    "nice",
    "bye",
    "joke",
    "quick",
    "quickly",
    "briefly",
    "short",
    "simple",
    "summarize",
    "summarise",
    "tldr",
];

/// The words of a text, lower case, split at anything but letters, digits, `+` and `'`.
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_alphanumeric() || c == '+' || c == '\''))
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

fn count_in(words: &[String], list: &[&str]) -> usize {
    words.iter().filter(|w| list.contains(&w.as_str())).count()
}

/// How much of a line looks like source code.
fn code_line(line: &str) -> bool {
    let t = line.trim();
    if t.is_empty() {
        return false;
    }
    t.ends_with(';')
        || t.ends_with('{')
        || t == "}"
        || t.ends_with(':')
            && (t.starts_with("def ") || t.starts_with("if ") || t.starts_with("for "))
        || [
            "fn ",
            "def ",
            "let ",
            "const ",
            "var ",
            "import ",
            "#include",
            "public ",
            "return ",
            "select ",
            "SELECT ",
            "class ",
            "func ",
            "impl ",
            "use ",
            "package ",
            "print(",
            "console.log",
            "async ",
            "await ",
        ]
        .iter()
        .any(|p| t.starts_with(p))
        || t.contains("=>")
        || t.contains("->")
        || t.contains("::")
        || t.contains("();")
}

fn math_symbols(text: &str) -> usize {
    let symbols = text
        .chars()
        .filter(|c| "∫∑√π≤≥≠∞∂∈∀∃θλσμ^".contains(*c))
        .count();
    let latex = ["\\frac", "\\int", "\\sum", "\\sqrt", "\\lim", "$$"]
        .iter()
        .filter(|p| text.contains(*p))
        .count();
    // Formulas with a variable: "x^2", "2x + 3 = 7", "f(x)", "dx".
    let formula = text
        .split_whitespace()
        .filter(|w| {
            let w = w.trim_matches(|c: char| c == ',' || c == '.' || c == '?');
            (w.contains('=') || w.contains("^") || w.starts_with("f(") || w == "dx")
                && w.chars().any(|c| c.is_ascii_alphanumeric())
        })
        .count();
    symbols + 3 * latex + formula
}

impl TextSignals {
    pub fn of(text: &str) -> Self {
        let words: Vec<String> = words(text).collect();
        let n = words.len() as f32;
        let lines: Vec<&str> = text.lines().collect();
        let code_lines = lines.iter().filter(|l| code_line(l)).count();
        let fenced = text.contains("```");
        let code = if fenced || code_lines >= 3 {
            1.0
        } else {
            (code_lines as f32 * 0.3 + count_in(&words, CODE_WORDS) as f32 * 0.2).min(1.0)
        };
        let math = (math_symbols(text) as f32 * 0.25 + count_in(&words, MATH_WORDS) as f32 * 0.35)
            .min(1.0);
        let listed = lines
            .iter()
            .filter(|l| {
                let t = l.trim_start();
                t.starts_with("- ")
                    || t.starts_with("* ")
                    || t.chars().next().is_some_and(|c| c.is_ascii_digit())
                        && (t.contains(". ") || t.contains(") "))
            })
            .count();
        let questions = text.matches('?').count().saturating_sub(1);
        let steps = (listed as f32 * 0.2
            + count_in(&words, SEQUENCERS) as f32 * 0.06
            + count_in(&words, CONSTRAINTS) as f32 * 0.12
            + questions as f32 * 0.15)
            .min(1.0);
        let analysis = (count_in(&words, ANALYSIS_WORDS) as f32 * 0.3).min(1.0);
        let simple = (count_in(&words, SIMPLE_WORDS) as f32 * 0.5).min(1.0);
        Self {
            length: ((1.0 + n).ln() / 1000f32.ln()).min(1.0),
            code,
            math,
            steps,
            analysis,
            simple,
        }
    }
}

/// `ln(1 + n)` scaled so that `full` reads 1 (and more stays 1).
pub fn log_share(n: usize, full: usize) -> f32 {
    ((1.0 + n as f32).ln() / (1.0 + full as f32).ln()).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_and_math_and_steps_are_seen() {
        let code = TextSignals::of("why does this deadlock?\n```rust\nlet a = m.lock();\n```");
        assert_eq!(code.code, 1.0);
        let plain = TextSignals::of("what is the capital of Peru");
        assert_eq!(plain.code, 0.0);
        assert!(plain.simple > 0.0);
        let math = TextSignals::of("Prove that the integral of f(x) = x^2 over [0,1] is 1/3");
        assert!(math.math >= 0.9, "{math:?}");
        let steps = TextSignals::of(
            "1. fetch the data\n2. clean it\n3. then plot it, and make sure the axes are labelled; avoid colour",
        );
        assert!(steps.steps > 0.6, "{steps:?}");
        assert!(TextSignals::of(&"word ".repeat(999)).length > 0.99);
        assert!(TextSignals::of("hi").length < 0.2);
    }

    #[test]
    fn subject_takes_the_newest_user_message_and_what_came_before() {
        let m = |role, text: &str| Message::text(role, text);
        let s = Subject::of(
            &[
                m(Role::System, "be brief"),
                m(Role::User, "solve x^2 = 4"),
                m(Role::Assistant, "x = 2 or x = -2"),
                m(Role::User, "and the general case?"),
            ],
            2,
        );
        assert_eq!(s.question, "and the general case?");
        assert_eq!(s.previous.as_deref(), Some("solve x^2 = 4"));
        assert_eq!(s.earlier, 2);
        assert_eq!(s.tools, 2);
        assert!(s.context.contains("x = 2"));
        assert_eq!(Subject::of(&[], 0), Subject::default());
    }
}
