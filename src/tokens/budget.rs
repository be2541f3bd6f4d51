//! Which stored messages fit the context budget (PROTOCOL §6). Pure: counts in, counts out.

/// Tokens of framing counted per message on top of its content.
pub const MESSAGE_FRAMING_TOKENS: u32 = 4;

/// The prompt budget of one turn: `budget_tokens − reserve_output_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextBudget {
    pub limit: u32,
}

impl ContextBudget {
    pub fn new(budget_tokens: u32, reserve_output_tokens: u32) -> Self {
        Self {
            limit: budget_tokens.saturating_sub(reserve_output_tokens),
        }
    }
}

/// The new message cannot fit the budget together with the system prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message needs {needed} prompt tokens with the system prompt; the budget is {limit}")]
pub struct TooLarge {
    pub needed: u32,
    pub limit: u32,
}

/// Decides how many of the newest earlier messages are sent with the system prompt and the new
/// message: an unbroken run ending at the new message, as long as it fits.
///
/// `history_newest_first` yields each earlier message's content tokens, newest first; it is read
/// only as far as needed. Returns the number of earlier messages to send and the prompt tokens
/// of the whole context.
///
/// # Errors
/// [`TooLarge`] when the system prompt and the new message alone exceed the budget.
pub fn fit_history(
    budget: ContextBudget,
    system_tokens: Option<u32>,
    new_message_tokens: u32,
    history_newest_first: impl IntoIterator<Item = u32>,
) -> Result<(usize, u32), TooLarge> {
    let cost = |tokens: u32| tokens.saturating_add(MESSAGE_FRAMING_TOKENS);
    let mut used = cost(new_message_tokens).saturating_add(system_tokens.map_or(0, cost));
    if used > budget.limit {
        return Err(TooLarge {
            needed: used,
            limit: budget.limit,
        });
    }
    let mut taken = 0;
    for tokens in history_newest_first {
        let next = used.saturating_add(cost(tokens));
        if next > budget.limit {
            break;
        }
        used = next;
        taken += 1;
    }
    Ok((taken, used))
}

/// The cost of a group of messages that are sent together or not at all (an assistant
/// message with tool calls and the results of its calls), as one item of [`fit_history`]:
/// their content tokens plus the framing of every message but one (`fit_history` adds that).
pub fn group_cost(tokens: impl IntoIterator<Item = u32>) -> u32 {
    let mut n = 0u32;
    let mut total = 0u32;
    for t in tokens {
        total = total.saturating_add(t);
        n += 1;
    }
    total.saturating_add(n.saturating_sub(1).saturating_mul(MESSAGE_FRAMING_TOKENS))
}

/// What a message is, as far as grouping is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A user message, or a reply without tool calls.
    Plain,
    /// An assistant message that called tools.
    Calls,
    /// A tool's result.
    Result,
}

/// Splits messages, newest first, into the groups trimming takes whole: each run of tool
/// results with the assistant message whose calls they answer, every other message alone.
/// Reads `messages` lazily, one group ahead at most; each group is newest first.
pub fn groups<T>(
    messages: impl Iterator<Item = T>,
    kind: impl Fn(&T) -> Kind,
) -> impl Iterator<Item = Vec<T>> {
    let mut messages = messages.peekable();
    std::iter::from_fn(move || {
        let first = messages.next()?;
        let mut group = vec![first];
        if kind(&group[0]) == Kind::Result {
            while let Some(m) = messages.next_if(|m| kind(m) == Kind::Result) {
                group.push(m);
            }
            if let Some(call) = messages.next_if(|m| kind(m) == Kind::Calls) {
                group.push(call);
            }
        }
        Some(group)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_results_group_with_their_call() {
        use Kind::{Calls, Plain, Result};
        // Newest first: a reply, two results, the call, a user message, a call with one result.
        let sizes = |kinds: &[Kind]| -> Vec<usize> {
            groups(kinds.iter().copied(), |k| *k)
                .map(|g| g.len())
                .collect()
        };
        let kinds = [Plain, Result, Result, Calls, Plain, Result, Calls, Plain];
        assert_eq!(sizes(&kinds), vec![1, 3, 1, 2, 1]);
        // A result run without its call (never stored so, but never glued to a stranger).
        assert_eq!(sizes(&[Result, Plain]), vec![1, 1]);
        assert_eq!(sizes(&[]), Vec::<usize>::new());
    }

    #[test]
    fn a_group_is_sent_whole_or_not_at_all() {
        // New message 10 (14 with framing). Newest group: a reply of 20. Next: a call of 10 with
        // two results of 10 → 30 + 3 × 4 = 42 as a whole. Budget 100: 14 + 24 + 42 = 80 fits,
        // the user message of 30 behind it (34) does not.
        let items = [group_cost([20]), group_cost([10, 10, 10]), group_cost([30])];
        assert_eq!(items, [20, 38, 30]);
        assert_eq!(fit_history(B, None, 10, items), Ok((2, 80)));
        // With a budget of 70 the group does not fit, and nothing behind it is sent either.
        let b = ContextBudget { limit: 70 };
        assert_eq!(fit_history(b, None, 10, items), Ok((1, 38)));
    }

    const B: ContextBudget = ContextBudget { limit: 100 };

    #[test]
    fn everything_fits() {
        assert_eq!(fit_history(B, Some(10), 10, [10, 10]), Ok((2, 56)));
    }

    #[test]
    fn budget_is_honoured_exactly() {
        // 14 (system) + 14 (new) = 28; each earlier message costs 24: two fit (76), three
        // would make 100 (fits exactly), four would make 124.
        assert_eq!(fit_history(B, Some(10), 10, [20, 20, 20, 20]), Ok((3, 100)));
        assert_eq!(fit_history(B, Some(10), 10, [20, 20, 21]), Ok((2, 76)));
    }

    #[test]
    fn run_is_unbroken() {
        // The second-newest does not fit; the small one behind it must not be sent either.
        assert_eq!(fit_history(B, None, 10, [10, 90, 1]), Ok((1, 28)));
    }

    #[test]
    fn no_system_prompt() {
        assert_eq!(fit_history(B, None, 96, [0]), Ok((0, 100)));
    }

    #[test]
    fn oversized_new_message_is_refused() {
        assert_eq!(
            fit_history(B, Some(10), 83, []),
            Err(TooLarge {
                needed: 101,
                limit: 100
            })
        );
        assert_eq!(
            fit_history(B, None, 97, []),
            Err(TooLarge {
                needed: 101,
                limit: 100
            })
        );
    }

    #[test]
    fn budget_subtracts_reserve() {
        assert_eq!(ContextBudget::new(8192, 1024).limit, 7168);
        assert_eq!(ContextBudget::new(10, 20).limit, 0);
    }
}
