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

#[cfg(test)]
mod tests {
    use super::*;

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
