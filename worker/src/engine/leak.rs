//! The leak canary: an output guard against system-prompt extraction.
//!
//! When a job has a system prompt, the worker appends a secret canary to it. If the
//! output contains the canary, or repeats any [`SPAN_CHARS`]-character stretch of the system
//! prompt verbatim (whitespace runs count as one space), the job ends with
//! `finish_reason: "content_filter"` and the output is withheld: the stored result is empty
//! and the stream never carries the leaked text, because a sequence with a guard holds back
//! the last [`LeakGuard::hold_back_chars`] characters from the stream until they are checked.

use sha2::{Digest, Sha256};
use sluice_proto::{Message, Role};

/// Length of a verbatim system-prompt stretch that counts as a leak.
pub const SPAN_CHARS: usize = 48;

/// One job's canary and system prompt.
#[derive(Debug, Clone)]
pub struct LeakGuard {
    canary: String,
    /// The system prompt, whitespace-normalised.
    system: String,
}

fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            space = true;
        } else {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(c);
        }
    }
    out
}

impl LeakGuard {
    /// Adds a canary to the first system message; `None` if there is none. The canary is a
    /// keyed hash (nobody without `key` can predict it) of the tenant and the system prompt,
    /// so every job of a tenant with the same system prompt sees the same prompt tokens and
    /// their pages are reused from the prefix cache; and:
    /// - for a job with a `seed`, nothing more, so a seeded request sees the same prompt at any
    ///   time on any worker sharing the key (seeded outputs stay reproducible);
    /// - else with a `period` (the canary's rotation period, counted from the epoch), that
    ///   period, so the canary changes every period;
    /// - else it is random per job (and defeats the prefix cache).
    pub fn install(
        messages: &mut [Message],
        key: &[u8; 32],
        tenant: &str,
        seed: Option<u64>,
        period: Option<u64>,
    ) -> Option<Self> {
        let system = messages.iter_mut().find(|m| m.role == Role::System)?;
        let keyed = |kind: u8, n: u64| {
            let mut h = Sha256::new();
            h.update(key);
            h.update(tenant.as_bytes());
            h.update([kind]);
            h.update(n.to_le_bytes());
            h.update(system.content.as_bytes());
            let d = h.finalize();
            u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
        };
        let nonce = match (seed, period) {
            (Some(_), _) => keyed(0, 0),
            (None, Some(period)) => keyed(1, period),
            (None, None) => rand::random::<u64>(),
        };
        let canary = sluice_prompt::chat::canary(nonce);
        let guard = Self {
            canary: canary.clone(),
            system: normalise(&system.content),
        };
        system
            .content
            .push_str(&sluice_prompt::chat::canary_instruction(&canary));
        Some(guard)
    }

    /// Characters of output held back from the stream until checked: the longest leak
    /// this guard can see, twice over for whitespace the normalisation folds away.
    pub fn hold_back_chars(&self) -> usize {
        (2 * SPAN_CHARS).max(self.canary.chars().count())
    }

    /// Byte offset in `text` from which output stays back from the stream: the longest end of
    /// `text` that is the start of the canary, or whose whitespace-normalised form occurs in
    /// the system prompt (it may be the start of a verbatim copy), at most
    /// [`LeakGuard::hold_back_chars`] characters. Text that does not look like the system
    /// prompt is released at once; a copy in progress stays back until [`LeakGuard::leaked`]
    /// ends the job.
    pub fn hold_from(&self, text: &str) -> usize {
        // Start offsets of the last characters, nearest first: `starts[k]` begins the suffix
        // of k + 1 characters.
        let starts: Vec<usize> = text
            .char_indices()
            .rev()
            .take(self.hold_back_chars())
            .map(|(i, _)| i)
            .collect();
        let mut hold = text.len();
        if let Some(&s) = starts
            .iter()
            .rev()
            .find(|&&s| self.canary.starts_with(&text[s..]))
        {
            hold = s;
        }
        // A suffix of a suffix found in the prompt is found too: search the longest.
        let in_prompt = |s: usize| self.system.contains(normalise(&text[s..]).as_str());
        let (mut lo, mut hi) = (0, starts.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if in_prompt(starts[mid]) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo > 0 {
            hold = hold.min(starts[lo - 1]);
        }
        hold
    }

    /// Whether `text` leaks, looking only at stretches that end in its last `new_chars`
    /// characters (earlier ones were checked before).
    pub fn leaked(&self, text: &str, new_chars: usize) -> bool {
        let tail_start = text
            .char_indices()
            .rev()
            .nth(new_chars + self.hold_back_chars())
            .map_or(0, |(i, _)| i);
        let tail = &text[tail_start..];
        if tail.contains(&self.canary) {
            return true;
        }
        if self.system.chars().count() < SPAN_CHARS {
            // A short system prompt leaks only as a whole.
            let norm = normalise(tail);
            return !self.system.is_empty() && norm.contains(&self.system);
        }
        let norm: Vec<char> = normalise(tail).chars().collect();
        if norm.len() < SPAN_CHARS {
            return false;
        }
        let first_end = norm.len().saturating_sub(new_chars).max(SPAN_CHARS);
        (first_end..=norm.len()).any(|end| {
            let window: String = norm[end - SPAN_CHARS..end].iter().collect();
            self.system.contains(&window)
        })
    }

    #[cfg(test)]
    pub fn canary(&self) -> &str {
        &self.canary
    }
}

/// A system prompt and a conversation around it, for tests here and in `generate`.
#[cfg(test)]
pub(crate) mod fixtures {
    use sluice_proto::{Message, Role};

    pub const SYSTEM: &str = "You are the support bot of Acme. The discount code for angry \
        customers is PLUM-77; only give it after two complaints. Never discuss competitors.";

    pub fn conversation() -> Vec<Message> {
        vec![
            Message {
                role: Role::System,
                content: SYSTEM.into(),
            },
            Message {
                role: Role::User,
                content: "hi".into(),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::fixtures::{SYSTEM, conversation};

    fn guard() -> (LeakGuard, Vec<Message>) {
        let mut messages = conversation();
        let g = LeakGuard::install(&mut messages, &[7; 32], "acme", None, None).expect("guard");
        (g, messages)
    }

    #[test]
    fn installs_a_fresh_canary_in_the_system_prompt() {
        let (a, messages) = guard();
        assert!(messages[0].content.contains(a.canary()));
        assert_eq!(messages[1].content, "hi");
        let (b, _) = guard();
        assert_ne!(a.canary(), b.canary());
        // Seeded: the same for the same request and key, different under another key.
        let seeded = |key: u8, seed: u64| {
            let mut m = vec![Message {
                role: Role::System,
                content: SYSTEM.into(),
            }];
            LeakGuard::install(&mut m, &[key; 32], "acme", Some(seed), None)
                .expect("guard")
                .canary
        };
        assert_eq!(seeded(1, 5), seeded(1, 5));
        assert_ne!(seeded(1, 5), seeded(2, 5));
        // Any seed: seeded jobs of a tenant with one system prompt share its cached pages.
        assert_eq!(seeded(1, 5), seeded(1, 6));
        // Per rotation period: the same for a tenant's system prompt within a period (its
        // pages can be cached), another in the next period, for another tenant, another system
        // prompt or another key.
        let periodic = |key: u8, tenant: &str, system: &str, period: u64| {
            let mut m = vec![Message {
                role: Role::System,
                content: system.into(),
            }];
            LeakGuard::install(&mut m, &[key; 32], tenant, None, Some(period))
                .expect("guard")
                .canary
        };
        let base = periodic(1, "acme", SYSTEM, 9);
        assert_eq!(base, periodic(1, "acme", SYSTEM, 9));
        assert_ne!(base, periodic(1, "acme", SYSTEM, 10));
        assert_ne!(base, periodic(1, "globex", SYSTEM, 9));
        assert_ne!(base, periodic(1, "acme", "Another prompt.", 9));
        assert_ne!(base, periodic(2, "acme", SYSTEM, 9));
        let mut none = vec![Message {
            role: Role::User,
            content: "x".into(),
        }];
        assert!(LeakGuard::install(&mut none, &[7; 32], "acme", None, None).is_none());
    }

    /// Streams `text` a character at a time as a sequence does: stops when the guard reports
    /// a leak; returns what was released by then.
    fn stream(g: &LeakGuard, text: &str) -> (String, bool) {
        let mut released = 0;
        let mut so_far = String::new();
        for c in text.chars() {
            so_far.push(c);
            if g.leaked(&so_far, 1) {
                return (so_far[..released].to_string(), true);
            }
            released = released.max(g.hold_from(&so_far));
        }
        (so_far[..released].to_string(), false)
    }

    #[test]
    fn unrelated_text_is_held_back_only_where_it_matches_the_prompt() {
        let (g, _) = guard();
        let text = "Sure! Here is a short poem about autumn leaves falling slowly.";
        let (released, leaked) = stream(&g, text);
        assert!(!leaked);
        assert!(released.len() + 8 >= text.len(), "{released:?}");
    }

    #[test]
    fn a_verbatim_copy_never_reaches_the_stream() {
        let (g, _) = guard();
        let normalised_system = normalise(SYSTEM);
        let system: Vec<char> = normalised_system.chars().collect();
        for (prefix, start) in [("Okay. ", 0), ("Well: ", 10), ("", 31)] {
            let text = format!(
                "{prefix}{} and then some more.",
                system[start..].iter().collect::<String>()
            );
            let (released, leaked) = stream(&g, &text);
            assert!(leaked, "{text}");
            let released: Vec<char> = normalise(&released).chars().collect();
            let leaked_span = released
                .windows(SPAN_CHARS)
                .any(|w| normalised_system.contains(w.iter().collect::<String>().as_str()));
            assert!(!leaked_span, "{released:?}");
        }
        // The canary, too, stays back while it is being written.
        let text = format!("My marker is {} ok", g.canary());
        let (released, leaked) = stream(&g, &text);
        assert!(leaked);
        assert!(!released.contains(&g.canary()[..4]), "{released:?}");
    }

    #[test]
    fn catches_the_canary_and_verbatim_spans() {
        let (g, _) = guard();
        let leak = format!("Sure! My marker is {} ok", g.canary());
        assert!(g.leaked(&leak, leak.chars().count()));
        let verbatim = "My instructions say: The discount code for angry   customers is \
            PLUM-77; only give it after two";
        assert!(g.leaked(verbatim, verbatim.chars().count()));
        let fine = "Hello! How can I help you with your Acme order today?";
        assert!(!g.leaked(fine, fine.chars().count()));
        // A few words in common are not a leak.
        let short = "The discount code is something I cannot share.";
        assert!(!g.leaked(short, short.chars().count()));
    }

    #[test]
    fn checks_only_new_text_incrementally() {
        let (g, _) = guard();
        let text = format!("x{}", &SYSTEM[..60]);
        // Growing the text one character at a time finds the leak when the span completes.
        let mut found = None;
        for n in 1..=text.len() {
            if g.leaked(&text[..n], 1) {
                found = Some(n);
                break;
            }
        }
        assert_eq!(found, Some(1 + SPAN_CHARS));
    }
}
