//! The boundary where outside text and numbers enter the runner.
//!
//! Builders, Nix, builds (their logs and `nix-support` files) and clients
//! send bytes and numbers the runner did not choose: NUL bytes, invalid
//! UTF-8, colour codes, megabytes of text, times past 2038, counts that do
//! not fit Hydra's `integer` columns. PostgreSQL refuses a NUL in `text`
//! and an out-of-range integer, and such a refusal used to stop the runner,
//! which met the same value again after its restart: a crash loop. So
//! every outside value is made fit here before it goes anywhere near a
//! column:
//!
//! - text shown to people (error messages, release names, product names,
//!   reasons) is *cleaned*: colour codes removed as Hydra stores them, NUL
//!   and other control characters replaced, cut to a bound;
//! - names that identify something (machines, systems, features, output
//!   names) are *checked*: a bad one is refused with what is wrong;
//! - numbers are range-checked against the column they go to.
//!
//! Logs are not text: they stay bytes end to end and are only decoded
//! (lossily) when shown.

use thiserror::Error;

/// The longest error message kept (Hydra's errorMsg holds Nix's message,
/// which quotes the log's last lines).
pub const ERROR_MSG_MAX: usize = 64 << 10;
/// The longest display name kept (release names, product names, units).
pub const DISPLAY_MAX: usize = 1024;
/// The longest identifier accepted (machine names, systems, features).
pub const NAME_MAX: usize = 255;

/// An outside value the runner refuses, naming it and what is wrong.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum OutsideError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes long; at most {max} are accepted")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} contains the control character {found:?}")]
    Control { what: &'static str, found: char },
    #[error("{what} is {value}, beyond the largest accepted value {max}")]
    OutOfRange {
        what: &'static str,
        value: u64,
        max: u64,
    },
}

/// Text for people, from bytes that may not be UTF-8 (a `nix-support`
/// file, say): decoded lossily, then [`display_text`].
pub fn display_bytes(raw: &[u8], max: usize) -> String {
    display_text(&String::from_utf8_lossy(raw), max)
}

/// Text for people: ANSI escape sequences removed, NUL and every other
/// control character but newline and tab replaced by U+FFFD, and at most
/// `max` bytes (cut at a character boundary, with a note saying so).
pub fn display_text(raw: &str, max: usize) -> String {
    let mut out = String::with_capacity(raw.len().min(max));
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => skip_escape(&mut chars),
            '\n' | '\t' => out.push(c),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    truncate(out, max)
}

/// Skips the rest of an escape sequence whose ESC was just read: a CSI
/// (`ESC [ ... final`), an OSC (`ESC ] ... BEL` or `ESC ] ... ESC \`), or
/// a two-character escape.
fn skip_escape(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    match chars.next() {
        Some('[') => {
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        }
        Some(']') => {
            while let Some(c) = chars.next() {
                if c == '\u{7}' {
                    break;
                }
                if c == '\u{1b}' {
                    chars.next_if_eq(&'\\');
                    break;
                }
            }
        }
        _ => {}
    }
}

const TRUNCATED: &str = " [...truncated]";

fn truncate(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut cut = max.saturating_sub(TRUNCATED.len());
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push_str(TRUNCATED);
    s
}

/// An identifier (a machine name, a system, a feature, an output name):
/// non-empty, at most [`NAME_MAX`] bytes, no control characters.
pub fn name<'a>(raw: &'a str, what: &'static str) -> Result<&'a str, OutsideError> {
    if raw.is_empty() {
        return Err(OutsideError::Empty { what });
    }
    if raw.len() > NAME_MAX {
        return Err(OutsideError::TooLong {
            what,
            len: raw.len(),
            max: NAME_MAX,
        });
    }
    if let Some(found) = raw.chars().find(|c| c.is_control()) {
        return Err(OutsideError::Control { what, found });
    }
    Ok(raw)
}

/// Every identifier of a list (see [`name`]).
pub fn names(raw: &[String], what: &'static str) -> Result<(), OutsideError> {
    raw.iter().try_for_each(|n| name(n, what).map(|_| ()))
}

/// A time in Unix seconds for one of Hydra's `integer` time columns; 0
/// means unknown.
pub fn unix_time(v: u64, what: &'static str) -> Result<Option<i32>, OutsideError> {
    if v == 0 {
        return Ok(None);
    }
    small(v, what).map(Some)
}

/// A count for an `integer` column.
pub fn small(v: u64, what: &'static str) -> Result<i32, OutsideError> {
    i32::try_from(v).map_err(|_| OutsideError::OutOfRange {
        what,
        value: v,
        max: i32::MAX as u64,
    })
}

/// A size in bytes for a `bigint` column.
pub fn size(v: u64, what: &'static str) -> Result<i64, OutsideError> {
    i64::try_from(v).map_err(|_| OutsideError::OutOfRange {
        what,
        value: v,
        max: i64::MAX as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ESC: char = '\u{1b}';

    #[test]
    fn colour_codes_go_and_control_characters_are_replaced() {
        assert_eq!(
            display_text("\u{1b}[31;1merror:\u{1b}[0m bad\0thing\r\n\tok", 100),
            "error: bad\u{fffd}thing\u{fffd}\n\tok"
        );
        assert_eq!(
            display_text("\u{1b}]8;;http://x\u{7}link\u{1b}]8;;\u{1b}\\ done", 100),
            "link done"
        );
    }

    #[test]
    fn invalid_utf8_is_shown_lossily() {
        assert_eq!(display_bytes(b"caf\xe9", 100), "caf\u{fffd}");
    }

    #[test]
    fn long_text_is_cut_at_a_character_boundary_and_says_so() {
        let s = display_text(&"é".repeat(100), 40);
        assert!(s.len() <= 40, "{}", s.len());
        assert!(s.ends_with(TRUNCATED), "{s}");
        assert!(s.starts_with("éé"));
    }

    #[test]
    fn names_are_refused_with_what_is_wrong() {
        assert_eq!(name("builder-1", "machine name"), Ok("builder-1"));
        assert_eq!(
            name("", "machine name"),
            Err(OutsideError::Empty {
                what: "machine name"
            })
        );
        let err = name("a\0b", "machine name").unwrap_err();
        assert_eq!(
            err.to_string(),
            "machine name contains the control character '\\0'"
        );
        assert!(matches!(
            name(&"x".repeat(300), "system"),
            Err(OutsideError::TooLong { len: 300, .. })
        ));
    }

    #[test]
    fn numbers_must_fit_their_columns() {
        assert_eq!(unix_time(0, "start time"), Ok(None));
        assert_eq!(
            unix_time(1_700_000_000, "start time"),
            Ok(Some(1_700_000_000))
        );
        let err = unix_time(u64::MAX, "stop time").unwrap_err();
        assert!(
            err.to_string()
                .contains("stop time is 18446744073709551615"),
            "{err}"
        );
        assert!(size(u64::MAX, "NAR size").is_err());
        assert_eq!(size(5, "NAR size"), Ok(5));
    }

    proptest! {
        /// Whatever comes in, what goes to PostgreSQL has no NUL, no
        /// escape character, is valid UTF-8 (a `String`) and is bounded.
        #[test]
        fn cleaned_text_is_always_storable(raw in proptest::collection::vec(any::<u8>(), 0..400), max in 16usize..200) {
            let s = display_bytes(&raw, max);
            prop_assert!(!s.contains('\0'));
            prop_assert!(!s.contains(ESC), "an escape character is left");
            prop_assert!(s.len() <= max);
        }

        #[test]
        fn a_checked_name_has_no_control_characters(raw in ".{0,300}") {
            if let Ok(n) = name(&raw, "name") {
                prop_assert!(!n.chars().any(char::is_control));
                prop_assert!(!n.is_empty() && n.len() <= NAME_MAX);
            }
        }
    }
}
