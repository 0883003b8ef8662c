//! Property tests of the operations against simple reference implementations.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dlb_compute::ops::Cancel;
use dlb_compute::ops::fibonacci::fibonacci;
use dlb_compute::ops::palindrome::is_palindrome;
use dlb_compute::ops::prime::{Number, is_prime, is_prime_u64, parse_number};
use dlb_compute::ops::reverse::{reverse, reverse_by_segmenting_everything};
use dlb_compute::ops::word_count::word_count;
use proptest::prelude::*;

/// Any text, including pieces that attach to their neighbours (lone combining marks, lone
/// regional indicators, lone CR), so the fast paths meet every case they must not break.
fn tricky_text() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        "[a-z ]{0,4}",
        Just("\r\n".to_owned()),
        Just("\r".to_owned()),
        Just("e\u{301}".to_owned()),
        Just("\u{301}".to_owned()),
        Just("\u{1F1EB}\u{1F1F7}".to_owned()),
        Just("\u{1F1E9}".to_owned()),
        Just("\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}".to_owned()),
        Just("\u{1F44D}\u{1F3FD}".to_owned()),
        Just("\u{600}1".to_owned()),
        Just("\u{915}\u{94D}\u{937}".to_owned()),
        Just("\u{1100}\u{1161}".to_owned()),
        "\\PC{0,3}",
    ];
    proptest::collection::vec(pieces, 0..12).prop_map(|v| v.concat())
}

/// Text made of whole grapheme clusters that each start with a base character. Reversal keeps
/// such clusters intact on both sides, so reversing twice gives the text back. (For arbitrary
/// text it need not: "\u{301}" + a flag reverses to a flag with an accent, one new cluster.)
fn whole_clusters() -> impl Strategy<Value = String> {
    let clusters = prop_oneof![
        "[a-zA-Z0-9 ,.!?]{1,4}",
        Just("\r\n".to_owned()),
        Just("e\u{301}".to_owned()),
        Just("\u{1F1EB}\u{1F1F7}".to_owned()),
        Just("\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}".to_owned()),
        Just("\u{1F44D}\u{1F3FD}".to_owned()),
        Just("\u{915}\u{94D}\u{937}".to_owned()),
        Just("\u{1100}\u{1161}".to_owned()),
        "[а-яё]{1,3}",
        "[ぁ-ゖ]{1,3}",
        "[一-龥]{1,3}",
    ];
    proptest::collection::vec(clusters, 0..12).prop_map(|v| v.concat())
}

fn trial_division(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

proptest! {
    #[test]
    fn reverse_twice_is_identity(s in whole_clusters()) {
        prop_assert_eq!(reverse(&reverse(&s)), s);
    }

    #[test]
    fn reverse_matches_full_segmentation(s in tricky_text()) {
        prop_assert_eq!(reverse(&s), reverse_by_segmenting_everything(&s));
    }

    #[test]
    fn text_followed_by_its_reverse_is_a_palindrome(s in whole_clusters()) {
        let joined = format!("{s}{}", reverse(&s));
        prop_assert!(is_palindrome(&joined, false), "{:?}", joined);
    }

    #[test]
    fn ascii_word_count_matches_split_whitespace(s in "[a-c \t\n\r\x0b\x0c]{0,200}") {
        let counts = word_count(&s, 0, &Cancel::new()).unwrap();
        prop_assert_eq!(counts.words, s.split_whitespace().count() as u64);
        prop_assert_eq!(counts.lines, s.matches('\n').count() as u64);
    }

    #[test]
    fn parse_round_trips_decimal(n in any::<u64>(), zeros in 0usize..5) {
        let text = format!("{}{n}", "0".repeat(zeros));
        prop_assert_eq!(parse_number(&text, 20), Ok(Number::Small(n)));
    }
}

#[test]
fn is_prime_agrees_with_trial_division_below_a_million() {
    // A sieve is the fast oracle; spot-check the sieve itself against trial division.
    const LIMIT: usize = 1_000_000;
    let mut composite = vec![false; LIMIT];
    composite[0] = true;
    composite[1] = true;
    let mut i = 2;
    while i * i < LIMIT {
        if !composite[i] {
            let mut j = i * i;
            while j < LIMIT {
                composite[j] = true;
                j += i;
            }
        }
        i += 1;
    }
    for n in (0..LIMIT as u64).step_by(997) {
        assert_eq!(!composite[n as usize], trial_division(n), "sieve at {n}");
    }
    for n in 0..LIMIT as u64 {
        assert_eq!(is_prime_u64(n), !composite[n as usize], "{n}");
    }
}

proptest! {
    #[test]
    fn is_prime_agrees_with_trial_division_on_random_u64s(n in 0u64..(1u64 << 40)) {
        prop_assert_eq!(is_prime_u64(n), trial_division(n));
    }

    #[test]
    fn products_above_2_64_are_composite(p in 3u64.., q in (1u64 << 32)..) {
        // Every such product is at least 2^64, so it takes the Baillie-PSW path.
        let n = u128::from(p | 1) * u128::from(q);
        let big = parse_number(&n.to_string(), 100).unwrap();
        prop_assert!(matches!(big, Number::Big(_)));
        let answer = is_prime(&big, &Cancel::new()).unwrap();
        prop_assert!(!answer.prime, "{} = {} * {}", n, p | 1, q);
    }
}

#[test]
fn fast_doubling_agrees_with_iterative_sum_up_to_2000() {
    let cancel = Cancel::new();
    let (mut a, mut b) = (dashu_int::UBig::ZERO, dashu_int::UBig::ONE);
    for n in 0..=2_000u64 {
        assert_eq!(fibonacci(n, &cancel).unwrap(), a.to_string(), "F({n})");
        let next = &a + &b;
        a = b;
        b = next;
    }
}
