//! Sharding key values: which column types Weir can route on, and how a key
//! arrives from a client — as a SQL literal, or as a Bind parameter in text or
//! binary format — turned into a [`KeyValue`] without allocating.
//!
//! Parsing follows PostgreSQL 15's input functions, so that Weir accepts
//! exactly the spellings the server accepts and routes them the same way:
//! `int4in`/`int8in` (`pg_strtoint32`/`pg_strtoint64`), `uuid_in`
//! (`string_to_uuid`), and for text the rule that a value is valid in the
//! (UTF-8) encoding and has no zero byte (`pg_verify_mbstr`). A value that
//! PostgreSQL would reject is an error here too, never a guess.

use super::HashError;
use std::fmt;
use std::num::IntErrorKind;
use std::str::FromStr;
use thiserror::Error;

/// The type of a hash-partitioned sharding column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// `bigint` (`int8`), hashed by `hashint8extended`.
    Bigint,
    /// `integer` (`int4`), hashed by `hashint4extended`.
    Integer,
    /// `text` or `varchar` with a deterministic collation, hashed by
    /// `hashtextextended`.
    Text,
    /// `uuid`, hashed by `uuid_hash_extended`.
    Uuid,
}

impl KeyType {
    /// The name PostgreSQL uses for the type in messages.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Bigint => "bigint",
            KeyType::Integer => "integer",
            KeyType::Text => "text",
            KeyType::Uuid => "uuid",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown sharding key type \"{0}\" (expected bigint, integer, text or uuid)")]
pub struct UnknownKeyType(pub String);

impl FromStr for KeyType {
    type Err = UnknownKeyType;

    /// Accepts PostgreSQL's type names and aliases, in any case as SQL does.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "bigint" | "int8" => Ok(KeyType::Bigint),
            "integer" | "int" | "int4" => Ok(KeyType::Integer),
            "text" | "varchar" | "character varying" => Ok(KeyType::Text),
            "uuid" => Ok(KeyType::Uuid),
            _ => Err(UnknownKeyType(s.to_string())),
        }
    }
}

/// One sharding key value, borrowed from the query or message it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyValue<'a> {
    Null,
    /// An `integer` or `bigint`; both hash alike (PostgreSQL's `integer_ops`).
    Int(i64),
    Text(&'a str),
    Uuid([u8; 16]),
}

impl KeyValue<'_> {
    /// What kind of value this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            KeyValue::Null => "null",
            KeyValue::Int(_) => "integer",
            KeyValue::Text(_) => "text",
            KeyValue::Uuid(_) => "uuid",
        }
    }
}

/// The format code of a Bind parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamFormat {
    Text,
    Binary,
}

impl ParamFormat {
    /// Maps a Bind format code (0 text, 1 binary).
    pub fn from_code(code: i16) -> Result<Self, HashError> {
        match code {
            0 => Ok(ParamFormat::Text),
            1 => Ok(ParamFormat::Binary),
            other => Err(HashError::UnknownFormat(other)),
        }
    }
}

/// Parses a non-null key written in text form, as in a SQL literal (already
/// unquoted) or a text-format Bind parameter.
pub fn parse_key(key_type: KeyType, text: &str) -> Result<KeyValue<'_>, HashError> {
    match key_type {
        KeyType::Bigint => parse_int(text, key_type, i64::MIN, i64::MAX).map(KeyValue::Int),
        KeyType::Integer => {
            let (min, max) = (i32::MIN.into(), i32::MAX.into());
            parse_int(text, key_type, min, max).map(KeyValue::Int)
        }
        KeyType::Text => check_text(text).map(KeyValue::Text),
        KeyType::Uuid => parse_uuid(text).map(KeyValue::Uuid),
    }
}

/// Parses a non-null key sent as a binary-format Bind parameter.
///
/// Integers are big-endian of width 2, 4 or 8: the width is the parameter's
/// declared type, which may differ from the column's (`WHERE int4_col =
/// $1::int8`), and PostgreSQL hashes the integer types alike so that such
/// comparisons can use the partition key. The value must still fit the column.
pub fn parse_binary_key(key_type: KeyType, bytes: &[u8]) -> Result<KeyValue<'_>, HashError> {
    let wrong_length = HashError::BinaryLength {
        key_type,
        len: bytes.len(),
    };
    match key_type {
        KeyType::Bigint | KeyType::Integer => {
            let value = binary_int(bytes).ok_or(wrong_length)?;
            check_int_range(value, key_type).map(KeyValue::Int)
        }
        KeyType::Text => {
            let text = std::str::from_utf8(bytes).map_err(|_| HashError::InvalidText)?;
            check_text(text).map(KeyValue::Text)
        }
        KeyType::Uuid => {
            let uuid: [u8; 16] = bytes.try_into().map_err(|_| wrong_length)?;
            Ok(KeyValue::Uuid(uuid))
        }
    }
}

/// Parses one Bind parameter; `None` is a NULL (length -1 on the wire).
pub fn parse_param(
    key_type: KeyType,
    format: ParamFormat,
    value: Option<&[u8]>,
) -> Result<KeyValue<'_>, HashError> {
    let Some(bytes) = value else {
        return Ok(KeyValue::Null);
    };
    match format {
        ParamFormat::Binary => parse_binary_key(key_type, bytes),
        ParamFormat::Text => {
            let text = std::str::from_utf8(bytes).map_err(|_| HashError::InvalidText)?;
            parse_key(key_type, text)
        }
    }
}

/// `pg_strtoint32`/`pg_strtoint64` (PostgreSQL 15): optional surrounding C
/// whitespace, an optional sign, then decimal digits only (no `0x`, no `_`:
/// those arrived in PostgreSQL 16).
fn parse_int(text: &str, key_type: KeyType, min: i64, max: i64) -> Result<i64, HashError> {
    let trimmed = text.trim_matches(is_c_space);
    let value = trimmed.parse::<i64>().map_err(|e| match e.kind() {
        IntErrorKind::PosOverflow | IntErrorKind::NegOverflow => HashError::OutOfRange(key_type),
        _ => HashError::InvalidSyntax(key_type),
    })?;
    if value < min || value > max {
        return Err(HashError::OutOfRange(key_type));
    }
    Ok(value)
}

/// C `isspace` in the C locale, which is what `pg_strtoint*` skips.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

fn binary_int(bytes: &[u8]) -> Option<i64> {
    match *bytes {
        [a, b] => Some(i16::from_be_bytes([a, b]).into()),
        [a, b, c, d] => Some(i32::from_be_bytes([a, b, c, d]).into()),
        [a, b, c, d, e, f, g, h] => Some(i64::from_be_bytes([a, b, c, d, e, f, g, h])),
        _ => None,
    }
}

fn check_int_range(value: i64, key_type: KeyType) -> Result<i64, HashError> {
    if key_type == KeyType::Integer && i32::try_from(value).is_err() {
        return Err(HashError::OutOfRange(key_type));
    }
    Ok(value)
}

/// PostgreSQL text never holds a zero byte (`pg_verify_mbstr` rejects it).
fn check_text(text: &str) -> Result<&str, HashError> {
    if text.as_bytes().contains(&0) {
        return Err(HashError::InvalidText);
    }
    Ok(text)
}

/// `string_to_uuid`: 32 hex digits (either case), optionally wrapped in one
/// pair of braces, with at most one hyphen after any group of four digits
/// except the last. No whitespace.
fn parse_uuid(text: &str) -> Result<[u8; 16], HashError> {
    let syntax = HashError::InvalidSyntax(KeyType::Uuid);
    let mut rest = text.as_bytes();
    let braces = if let [b'{', inner @ ..] = rest {
        rest = inner;
        true
    } else {
        false
    };
    let mut uuid = [0u8; 16];
    for (i, byte) in uuid.iter_mut().enumerate() {
        let [hi, lo, tail @ ..] = rest else {
            return Err(syntax);
        };
        *byte = (hex_digit(*hi).ok_or(syntax)? << 4) | hex_digit(*lo).ok_or(syntax)?;
        rest = match tail {
            [b'-', after @ ..] if i % 2 == 1 && i < 15 => after,
            _ => tail,
        };
    }
    let rest = match (braces, rest) {
        (true, [b'}', after @ ..]) => after,
        (true, _) => return Err(syntax),
        (false, _) => rest,
    };
    if !rest.is_empty() {
        return Err(syntax);
    }
    Ok(uuid)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    //! Accepted and rejected spellings were checked against PostgreSQL 15.18
    //! (`SELECT '<text>'::int4`, `::int8`, `::uuid`).

    use super::*;

    const A0EE: [u8; 16] = [
        0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38, 0x0a,
        0x11,
    ];

    #[test]
    fn key_type_names_and_aliases_parse() {
        for (name, t) in [
            ("bigint", KeyType::Bigint),
            ("INT8", KeyType::Bigint),
            ("integer", KeyType::Integer),
            ("int", KeyType::Integer),
            ("int4", KeyType::Integer),
            ("text", KeyType::Text),
            ("varchar", KeyType::Text),
            ("uuid", KeyType::Uuid),
        ] {
            assert_eq!(name.parse::<KeyType>(), Ok(t), "{name}");
        }
        assert!("smallint".parse::<KeyType>().is_err());
    }

    #[test]
    fn integers_accept_what_int4in_and_int8in_accept() {
        for (text, want) in [
            ("42", 42),
            (" 42 ", 42),
            ("+42", 42),
            ("-0", 0),
            ("042", 42),
            ("\t42\n", 42),
            ("\x0b42\x0c", 42),
            ("\r42", 42),
            ("00000000000000000000000000042", 42),
            ("-2147483648", i32::MIN.into()),
            ("2147483647", i32::MAX.into()),
        ] {
            assert_eq!(
                parse_key(KeyType::Integer, text),
                Ok(KeyValue::Int(want)),
                "{text:?}"
            );
            assert_eq!(
                parse_key(KeyType::Bigint, text),
                Ok(KeyValue::Int(want)),
                "{text:?}"
            );
        }
        let big = parse_key(KeyType::Bigint, "-9223372036854775808");
        assert_eq!(big, Ok(KeyValue::Int(i64::MIN)));
    }

    #[test]
    fn integers_reject_what_postgres_rejects() {
        for text in [
            "", "-", "+", " ", "4 2", "0x10", "1_000", "1e3", "1.0", "--1", "+-1", "\u{a0}42", "٣",
        ] {
            for t in [KeyType::Integer, KeyType::Bigint] {
                assert_eq!(
                    parse_key(t, text),
                    Err(HashError::InvalidSyntax(t)),
                    "{text:?}"
                );
            }
        }
    }

    #[test]
    fn integers_out_of_the_column_range_are_errors() {
        let int = KeyType::Integer;
        for text in ["2147483648", "-2147483649", "9223372036854775808"] {
            assert_eq!(
                parse_key(int, text),
                Err(HashError::OutOfRange(int)),
                "{text}"
            );
        }
        let big = KeyType::Bigint;
        let too_big = parse_key(big, "9223372036854775808");
        assert_eq!(too_big, Err(HashError::OutOfRange(big)));
        assert_eq!(parse_key(big, "2147483648"), Ok(KeyValue::Int(1 << 31)));
    }

    #[test]
    fn uuid_accepts_every_spelling_uuid_in_accepts() {
        for text in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "A0EEBC999C0B4EF8BB6D6BB9BD380A11",
            "a0eebc99-9c0b4ef8-bb6d6bb9-bd380a11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11}",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert_eq!(
                parse_key(KeyType::Uuid, text),
                Ok(KeyValue::Uuid(A0EE)),
                "{text}"
            );
        }
    }

    #[test]
    fn uuid_rejects_what_uuid_in_rejects() {
        for text in [
            "a0e-ebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99--9c0b-4ef8-bb6d-6bb9bd380a11",
            "-a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-",
            " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11 ",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11-}",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111",
            "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380aé",
            "{}",
            "",
        ] {
            let got = parse_key(KeyType::Uuid, text);
            assert_eq!(got, Err(HashError::InvalidSyntax(KeyType::Uuid)), "{text}");
        }
    }

    #[test]
    fn text_with_a_zero_byte_is_rejected() {
        assert_eq!(
            parse_key(KeyType::Text, "a\0b"),
            Err(HashError::InvalidText)
        );
        assert_eq!(parse_key(KeyType::Text, ""), Ok(KeyValue::Text("")));
    }

    #[test]
    fn binary_integers_of_any_width_are_read_big_endian() {
        let int = KeyType::Integer;
        assert_eq!(parse_binary_key(int, &[0xff, 0xfe]), Ok(KeyValue::Int(-2)));
        assert_eq!(parse_binary_key(int, &[0, 0, 1, 0]), Ok(KeyValue::Int(256)));
        let eight = (-5_i64).to_be_bytes();
        assert_eq!(
            parse_binary_key(KeyType::Bigint, &eight),
            Ok(KeyValue::Int(-5))
        );
        assert_eq!(parse_binary_key(int, &eight), Ok(KeyValue::Int(-5)));
        let wide = (1_i64 << 40).to_be_bytes();
        assert_eq!(
            parse_binary_key(int, &wide),
            Err(HashError::OutOfRange(int))
        );
        let odd = parse_binary_key(KeyType::Bigint, &[1, 2, 3]);
        let want = HashError::BinaryLength {
            key_type: KeyType::Bigint,
            len: 3,
        };
        assert_eq!(odd, Err(want));
    }

    #[test]
    fn binary_uuid_and_text_are_raw_bytes() {
        assert_eq!(
            parse_binary_key(KeyType::Uuid, &A0EE),
            Ok(KeyValue::Uuid(A0EE))
        );
        let short = parse_binary_key(KeyType::Uuid, &A0EE[..15]);
        assert!(matches!(
            short,
            Err(HashError::BinaryLength { len: 15, .. })
        ));
        let text = parse_binary_key(KeyType::Text, "日本語".as_bytes());
        assert_eq!(text, Ok(KeyValue::Text("日本語")));
        let invalid = parse_binary_key(KeyType::Text, &[0xc3, 0x28]);
        assert_eq!(invalid, Err(HashError::InvalidText));
    }

    #[test]
    fn bind_parameters_dispatch_on_format_and_null() {
        let text = parse_param(KeyType::Bigint, ParamFormat::Text, Some(b"-7"));
        assert_eq!(text, Ok(KeyValue::Int(-7)));
        let bytes = (-7_i64).to_be_bytes();
        let binary = parse_param(KeyType::Bigint, ParamFormat::Binary, Some(&bytes));
        assert_eq!(binary, Ok(KeyValue::Int(-7)));
        let null = parse_param(KeyType::Uuid, ParamFormat::Binary, None);
        assert_eq!(null, Ok(KeyValue::Null));
        assert_eq!(ParamFormat::from_code(1), Ok(ParamFormat::Binary));
        assert_eq!(ParamFormat::from_code(2), Err(HashError::UnknownFormat(2)));
    }
}
