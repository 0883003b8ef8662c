//! `IsPalindrome`: does the text read the same backwards, by extended grapheme clusters?
//!
//! Exact mode compares clusters as they are ("Racecar" is not a palindrome). `normalize` keeps
//! only clusters that start with a letter or digit and compares them lowercased, so case,
//! whitespace, punctuation and symbols are ignored ("A man, a plan, a canal: Panama" is one).

use unicode_segmentation::UnicodeSegmentation;

/// Texts up to this many bytes are checked inline on the async runtime.
pub const INLINE_MAX_BYTES: usize = 64 * 1024;

/// Is `text` a palindrome?
pub fn is_palindrome(text: &str, normalize: bool) -> bool {
    if normalize {
        let kept: Vec<String> = text
            .graphemes(true)
            .filter(|g| g.chars().next().is_some_and(char::is_alphanumeric))
            .map(str::to_lowercase)
            .collect();
        kept.iter().eq(kept.iter().rev())
    } else if text.is_ascii() && !text.contains('\r') {
        text.bytes().eq(text.bytes().rev())
    } else {
        text.graphemes(true).eq(text.graphemes(true).rev())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_of_cases() {
        let cases: &[(&str, bool, bool)] = &[
            ("", false, true),
            ("a", false, true),
            ("abba", false, true),
            ("abc", false, false),
            ("Racecar", false, false),
            ("Racecar", true, true),
            ("A man, a plan, a canal: Panama", true, true),
            ("A man, a plan, a canal: Panama", false, false),
            ("No 'x' in Nixon", true, true),
            ("e\u{301}ae\u{301}", false, true),
            // By code points this would be "e a <accent> e" reversed; by clusters it is not one.
            ("e\u{301}a", false, false),
            ("\u{1F1EB}\u{1F1F7}\u{1F1EB}\u{1F1F7}", false, true),
            ("\u{1F1EB}\u{1F1F7}\u{1F1F7}\u{1F1EB}", false, false),
            ("Été", true, true),
            ("12321", true, true),
        ];
        for &(text, normalize, expected) in cases {
            assert_eq!(
                is_palindrome(text, normalize),
                expected,
                "{text:?} normalize={normalize}"
            );
        }
    }
}
