//! `WordCount`: words, lines, characters and bytes like `wc`, and the most frequent words.
//!
//! Words are runs of non-whitespace, whitespace being Unicode `White_Space` (as `wc -w` in a
//! UTF-8 locale); lines count `\n`; characters are Unicode scalar values. Pure-ASCII text takes a
//! branch-free byte loop that the compiler vectorizes.
//!
//! The frequency table case-folds words (Unicode lowercase) and trims punctuation at their ends,
//! so "The", "the" and "the," count as one word; runs with no letter or digit are left out of
//! the table (they still count as words). Ties are broken alphabetically.

use std::collections::HashMap;

use super::{Cancel, Cancelled, check};

/// Texts up to this many bytes are counted inline on the async runtime.
pub const INLINE_MAX_BYTES: usize = 64 * 1024;

/// The largest `top` accepted.
pub const MAX_TOP: u32 = 1_000;

/// Counts for one text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Counts {
    /// Runs of non-whitespace.
    pub words: u64,
    /// `\n` characters.
    pub lines: u64,
    /// Unicode scalar values.
    pub characters: u64,
    /// UTF-8 bytes.
    pub bytes: u64,
    /// The most frequent words, most frequent first, ties alphabetical.
    pub top: Vec<(String, u64)>,
}

/// Counts `text`, with the `top` most frequent words when `top > 0`.
///
/// # Errors
///
/// [`Cancelled`] when `cancel` fires while the frequency table is built.
pub fn word_count(text: &str, top: u32, cancel: &Cancel) -> Result<Counts, Cancelled> {
    let bytes = text.as_bytes();
    let mut counts = Counts {
        bytes: bytes.len() as u64,
        lines: count_newlines(bytes),
        ..Counts::default()
    };
    if bytes.is_ascii() {
        counts.characters = bytes.len() as u64;
        counts.words = count_words_ascii(bytes);
    } else {
        counts.characters = text.chars().count() as u64;
        counts.words = text.split_whitespace().count() as u64;
    }
    if top > 0 {
        counts.top = top_words(text, top as usize, cancel)?;
    }
    Ok(counts)
}

fn count_newlines(bytes: &[u8]) -> u64 {
    bytes.iter().map(|&b| u64::from(b == b'\n')).sum()
}

fn is_ascii_space(b: u8) -> bool {
    // Space, and \t \n \v \f \r (9..=13): Unicode White_Space within ASCII.
    b == b' ' || b.wrapping_sub(9) < 5
}

/// Word starts: a non-space byte at the beginning or after a space.
fn count_words_ascii(bytes: &[u8]) -> u64 {
    let Some(&first) = bytes.first() else {
        return 0;
    };
    let first_word = u64::from(!is_ascii_space(first));
    // Chunks keep the per-chunk sum in u32 lanes, which vectorizes better than one u64 sum.
    const CHUNK: usize = 1 << 16;
    let mut total = first_word;
    let mut offset = 1;
    while offset < bytes.len() {
        let end = (offset + CHUNK).min(bytes.len());
        let cur = &bytes[offset..end];
        let prev = &bytes[offset - 1..end - 1];
        let starts: u32 = cur
            .iter()
            .zip(prev)
            .map(|(&c, &p)| u32::from(!is_ascii_space(c) & is_ascii_space(p)))
            .sum();
        total += u64::from(starts);
        offset = end;
    }
    total
}

/// How many words pass between cancellation checks while building the frequency table.
const CHECK_EVERY_WORDS: usize = 1 << 14;

fn top_words(text: &str, top: usize, cancel: &Cancel) -> Result<Vec<(String, u64)>, Cancelled> {
    let mut freq: HashMap<String, u64> = HashMap::new();
    for (i, word) in text.split_whitespace().enumerate() {
        if i % CHECK_EVERY_WORDS == 0 {
            check(cancel)?;
        }
        let trimmed = word.trim_matches(|c: char| !c.is_alphanumeric());
        if trimmed.is_empty() {
            continue;
        }
        let key = if trimmed.chars().any(char::is_uppercase) {
            trimmed.to_lowercase()
        } else {
            trimmed.to_owned()
        };
        *freq.entry(key).or_insert(0) += 1;
    }
    let mut entries: Vec<(String, u64)> = freq.into_iter().collect();
    let by_rank = |a: &(String, u64), b: &(String, u64)| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0));
    if entries.len() > top {
        entries.select_nth_unstable_by(top - 1, by_rank);
        entries.truncate(top);
    }
    entries.sort_unstable_by(by_rank);
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wc(text: &str, top: u32) -> Counts {
        word_count(text, top, &Cancel::new()).unwrap()
    }

    #[test]
    fn table_of_cases() {
        let cases: &[(&str, u64, u64, u64, u64)] = &[
            ("", 0, 0, 0, 0),
            ("c, d-e", 2, 0, 6, 6),
            ("hello world\n", 2, 1, 12, 12),
            ("  leading and trailing  ", 3, 0, 24, 24),
            ("one\ttwo\nthree\r\nfour\x0bfive\x0csix", 6, 2, 28, 28),
            // U+00A0 NO-BREAK SPACE and U+3000 IDEOGRAPHIC SPACE are White_Space.
            ("a\u{a0}b\u{3000}c", 3, 0, 5, 8),
            ("Grüße, Welt", 2, 0, 11, 13),
            ("\u{1F44D}\u{1F3FD}", 1, 0, 2, 8),
        ];
        for &(text, words, lines, characters, bytes) in cases {
            let c = wc(text, 0);
            assert_eq!(
                (c.words, c.lines, c.characters, c.bytes),
                (words, lines, characters, bytes),
                "{text:?}"
            );
        }
    }

    #[test]
    fn ascii_and_unicode_paths_agree() {
        for text in ["a b  c", " x", "x ", "\n\n", "a\tb\nc", "   ", "ab"] {
            assert_eq!(
                count_words_ascii(text.as_bytes()),
                text.split_whitespace().count() as u64,
                "{text:?}"
            );
        }
        let long = "word ".repeat(50_000) + "tail";
        assert_eq!(count_words_ascii(long.as_bytes()), 50_001);
    }

    #[test]
    fn top_words_are_case_folded_and_ties_alphabetical() {
        let c = wc("The cat and the dog. THE END, the end; cat!", 3);
        assert_eq!(
            c.top,
            vec![
                ("the".to_owned(), 4),
                ("cat".to_owned(), 2),
                ("end".to_owned(), 2)
            ]
        );
        let ties = wc("b a c b a c", 2);
        assert_eq!(ties.top, vec![("a".to_owned(), 2), ("b".to_owned(), 2)]);
        assert!(wc("-- ...", 5).top.is_empty());
        assert!(wc("x y", 0).top.is_empty());
    }
}
