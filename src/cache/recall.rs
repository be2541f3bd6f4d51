//! Recall memory: which older turns to bring back when a conversation outgrows its budget.
//!
//! The newest turns that fit part of the budget are sent as usual; the rest of the budget goes
//! to the older turns most relevant to the new message, by the cache's embedder. A turn (a user
//! message and the reply right after it) is recalled whole or not at all, scored by the more
//! similar of its two messages, best first, as long as it clears `min_similarity` and fits;
//! the chosen turns are sent in chronological order, before the newest run.
//!
//! Pure: positions, costs and scores in, positions out.

/// An older message as recall sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Older {
    pub seq: u64,
    pub is_user: bool,
    /// Content tokens plus framing.
    pub cost: u32,
    /// Similarity to the new message.
    pub score: f32,
}

/// Chooses older messages (given oldest first) to recall within `budget` tokens; answers
/// their positions in `older`, ascending.
pub fn choose(older: &[Older], budget: u32, min_similarity: f32) -> Vec<usize> {
    // Group into turns: a user message with the assistant reply that follows it.
    let mut turns: Vec<(Vec<usize>, u32, f32)> = Vec::new();
    let mut i = 0;
    while i < older.len() {
        let m = older[i];
        let pair = older
            .get(i + 1)
            .filter(|r| m.is_user && !r.is_user && r.seq == m.seq + 1);
        match pair {
            Some(r) => {
                turns.push((
                    vec![i, i + 1],
                    m.cost.saturating_add(r.cost),
                    m.score.max(r.score),
                ));
                i += 2;
            }
            None => {
                turns.push((vec![i], m.cost, m.score));
                i += 1;
            }
        }
    }
    // Best first; among equals, the newer turn.
    let mut order: Vec<usize> = (0..turns.len()).collect();
    order.sort_by(|&a, &b| turns[b].2.total_cmp(&turns[a].2).then(b.cmp(&a)));
    let mut left = budget;
    let mut chosen = Vec::new();
    for t in order {
        let (members, cost, score) = &turns[t];
        if *score < min_similarity {
            break;
        }
        if *cost <= left {
            left -= cost;
            chosen.extend_from_slice(members);
        }
    }
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(seq: u64, cost: u32, score: f32) -> Older {
        Older {
            seq,
            is_user: seq % 2 == 1,
            cost,
            score,
        }
    }

    #[test]
    fn the_most_relevant_turns_that_fit_in_chronological_order() {
        let older = [
            m(1, 10, 0.9), // turn 1: the fact
            m(2, 10, 0.1),
            m(3, 10, 0.05), // turn 2: noise
            m(4, 10, 0.05),
            m(5, 10, 0.3), // turn 3: somewhat relevant
            m(6, 10, 0.6),
        ];
        assert_eq!(choose(&older, 40, 0.2), vec![0, 1, 4, 5]);
        // Only one turn fits: the best.
        assert_eq!(choose(&older, 25, 0.2), vec![0, 1]);
        // Nothing clears the bar.
        assert!(choose(&older, 100, 0.95).is_empty());
        // Too small for any turn.
        assert!(choose(&older, 15, 0.0).is_empty());
    }

    #[test]
    fn a_lone_message_is_a_turn_of_its_own() {
        let older = [m(2, 5, 0.8), m(3, 5, 0.1), m(4, 5, 0.1)];
        assert_eq!(choose(&older, 5, 0.2), vec![0]);
        assert_eq!(choose(&older, 100, 0.0), vec![0, 1, 2]);
    }
}
