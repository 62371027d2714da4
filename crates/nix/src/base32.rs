//! Nix's base32: a 32-letter alphabet without `e o u t`, written from the
//! last bit group to the first. It is not RFC 4648.

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Byte -> its digit, or [`NOT_A_DIGIT`]: every store path a load reads
/// is decoded, and a search of the alphabet per character was 2% of the
/// runner's CPU in the ingestion benchmark.
const DIGITS: [u8; 256] = {
    let mut table = [NOT_A_DIGIT; 256];
    let mut d = 0;
    while d < ALPHABET.len() {
        table[ALPHABET[d] as usize] = d as u8;
        d += 1;
    }
    table
};
const NOT_A_DIGIT: u8 = 0xff;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Base32Error {
    #[error("invalid character {0:?} in Nix base32 string")]
    InvalidChar(char),
    #[error("Nix base32 string of length {0} does not encode a whole number of bytes")]
    InvalidLength(usize),
}

/// Length of the base32 encoding of `bytes` bytes.
pub const fn encoded_len(bytes: usize) -> usize {
    (bytes * 8).div_ceil(5)
}

pub fn encode(input: &[u8]) -> String {
    let len = encoded_len(input.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let low = input[i] as u16 >> j;
        let high = if i + 1 < input.len() {
            (input[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((low | high) & 0x1f) as usize] as char);
    }
    out
}

pub fn decode(input: &str) -> Result<Vec<u8>, Base32Error> {
    let bytes_len = input.len() * 5 / 8;
    if encoded_len(bytes_len) != input.len() {
        return Err(Base32Error::InvalidLength(input.len()));
    }
    let mut out = vec![0u8; bytes_len];
    for (n, c) in input.bytes().rev().enumerate() {
        let digit = match DIGITS[c as usize] {
            NOT_A_DIGIT => return Err(Base32Error::InvalidChar(c as char)),
            d => d as u16,
        };
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        if i + 1 < bytes_len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(Base32Error::InvalidChar(c as char));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sha256_of_empty_string() {
        // `nix hash to-base32 sha256:e3b0c442...` as printed by Nix 2.8.
        let bytes = hex::decode("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
            .unwrap();
        assert_eq!(
            encode(&bytes),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    #[test]
    fn round_trips_every_length() {
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(decode(&encode(&bytes)).unwrap(), bytes);
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode("e").unwrap_err(), Base32Error::InvalidLength(1));
        assert!(decode("00000000000000000000000000000000e").is_err());
        assert_eq!(decode("zz").unwrap_err(), Base32Error::InvalidChar('z'));
    }

    #[test]
    fn every_letter_of_the_alphabet_is_its_digit_and_nothing_else_is_one() {
        for c in (0u8..=127).map(char::from) {
            // The last character is the lowest five bits of the first byte.
            let text = format!("{}{c}", "0".repeat(31));
            match ALPHABET.iter().position(|&a| char::from(a) == c) {
                Some(digit) => assert_eq!(decode(&text).unwrap()[0], digit as u8, "{c:?}"),
                None => assert_eq!(decode(&text).unwrap_err(), Base32Error::InvalidChar(c)),
            }
        }
        let text = format!("{}é", "0".repeat(30));
        assert!(matches!(decode(&text), Err(Base32Error::InvalidChar(_))));
    }

    proptest::proptest! {
        /// Any text is decoded or refused, never a panic; what decodes
        /// encodes back to itself.
        #[test]
        fn any_text_decodes_or_is_refused(text in "\\PC{0,60}") {
            if let Ok(bytes) = decode(&text) {
                proptest::prop_assert_eq!(encode(&bytes), text);
            }
        }

        #[test]
        fn any_bytes_round_trip(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            proptest::prop_assert_eq!(decode(&encode(&bytes)).unwrap(), bytes);
        }
    }
}
