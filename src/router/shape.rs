//! Statement shapes: a simple query with its key-position literals lifted out
//! (`WHERE id = 42` → `WHERE id = $1`), so every query of one shape shares one
//! cached analysis and only the lifted values differ.
//!
//! Only literals where a sharding key can stand are lifted: right after `=`,
//! and inside `IN (…)` or `VALUES (…)` lists. Literals elsewhere (LIMIT,
//! ORDER BY positions, typed literals like `DATE '…'`) stay in the shape, so
//! the analysis never depends on a lifted value except through its keys.

use std::borrow::Cow;

/// A query split into its shape and the lifted literal values, in order;
/// lifted value `i` is the parameter `$(first + i)` of the shape.
#[derive(Debug, PartialEq, Eq)]
pub struct Shape<'a> {
    pub text: String,
    pub first: usize,
    pub values: Vec<Cow<'a, str>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// `=`
    Eq,
    /// `(` or `,`, and whether it opens/continues a list whose items may be keys.
    ListOpen,
    Comma,
    Other,
}

/// Lifts key-position literals out of `sql`; `None` when there is nothing to
/// lift (the text is its own shape) or the text has parameters already.
pub fn lift(sql: &str) -> Option<Shape<'_>> {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut values: Vec<Cow<'_, str>> = Vec::new();
    // Positions in `out` where lifted values go, filled with numbers at the end.
    let mut holes: Vec<usize> = Vec::new();
    // Per open parenthesis: are its items key positions (IN/VALUES lists)?
    let mut lists: Vec<bool> = Vec::new();
    let mut prev = Tok::Other;
    let mut prev_word = String::new();
    let mut copied = 0;
    let mut i = 0;
    let in_list = |lists: &Vec<bool>| lists.last().copied().unwrap_or(false);
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i = skip_block_comment(b, i);
                continue;
            }
            b'$' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                // The text has its own parameters: leave it as it is.
                return None;
            }
            b'$' => {
                i = skip_dollar_quote(b, i);
                prev = Tok::Other;
                continue;
            }
            b'"' => {
                i = skip_quoted(b, i, b'"');
                prev = Tok::Other;
                prev_word.clear();
                continue;
            }
            b'\'' => {
                let end = skip_quoted(b, i, b'\'');
                let liftable = prev == Tok::Eq
                    || (matches!(prev, Tok::ListOpen | Tok::Comma) && in_list(&lists));
                if liftable && end > i + 1 && b[end - 1] == b'\'' && !followed_by_quote(b, end) {
                    let inner = &sql[i + 1..end - 1];
                    out.push_str(&sql[copied..i]);
                    holes.push(out.len());
                    values.push(if inner.contains("''") {
                        Cow::Owned(inner.replace("''", "'"))
                    } else {
                        Cow::Borrowed(inner)
                    });
                    copied = end;
                }
                i = end;
                prev = Tok::Other;
                prev_word.clear();
                continue;
            }
            b'0'..=b'9' | b'-' | b'.' => {
                let liftable = prev == Tok::Eq
                    || (matches!(prev, Tok::ListOpen | Tok::Comma) && in_list(&lists));
                let start = i;
                let mut j = i;
                if b[j] == b'-' {
                    j += 1;
                    while j < b.len() && b[j].is_ascii_whitespace() {
                        j += 1;
                    }
                }
                let digits_at = j;
                while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.') {
                    j += 1;
                }
                if j < b.len() && (b[j] == b'e' || b[j] == b'E') {
                    let mut k = j + 1;
                    if k < b.len() && (b[k] == b'+' || b[k] == b'-') {
                        k += 1;
                    }
                    if k < b.len() && b[k].is_ascii_digit() {
                        j = k;
                        while j < b.len() && b[j].is_ascii_digit() {
                            j += 1;
                        }
                    }
                }
                let is_number = j > digits_at && b[digits_at..j].iter().any(u8::is_ascii_digit);
                let ends_cleanly =
                    j >= b.len() || !(b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'$');
                if is_number && ends_cleanly {
                    if liftable {
                        out.push_str(&sql[copied..start]);
                        holes.push(out.len());
                        let text = &sql[start..j];
                        values.push(if b[start] == b'-' && digits_at > start + 1 {
                            Cow::Owned(format!("-{}", &sql[digits_at..j]))
                        } else {
                            Cow::Borrowed(text)
                        });
                        copied = j;
                    }
                    i = j;
                    prev = Tok::Other;
                    prev_word.clear();
                    continue;
                }
                // An operator or a lone dot.
                i += 1;
                prev = Tok::Other;
                prev_word.clear();
                continue;
            }
            b'=' => {
                // `=` alone, not part of `<=`, `>=`, `!=`, `=>`.
                let before = i.checked_sub(1).map(|p| b[p]);
                let after = b.get(i + 1).copied();
                prev = if matches!(before, Some(b'<' | b'>' | b'!' | b'='))
                    || matches!(after, Some(b'>' | b'='))
                {
                    Tok::Other
                } else {
                    Tok::Eq
                };
                i += 1;
                prev_word.clear();
                continue;
            }
            b'(' => {
                let list = prev_word.eq_ignore_ascii_case("in")
                    || prev_word.eq_ignore_ascii_case("values")
                    || (prev == Tok::Comma && lists.is_empty() && values_level(&prev_word));
                lists.push(list);
                prev = Tok::ListOpen;
                prev_word.clear();
                i += 1;
                continue;
            }
            b')' => {
                let was_list = lists.pop().unwrap_or(false);
                prev = Tok::Other;
                // `VALUES (…), (…)`: a comma after a row keeps the VALUES context.
                prev_word = if lists.is_empty() && was_list {
                    VALUES_ROW.into()
                } else {
                    String::new()
                };
                i += 1;
                continue;
            }
            b',' => {
                prev = Tok::Comma;
                if prev_word != VALUES_ROW {
                    prev_word.clear();
                }
                i += 1;
                continue;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                i = word_end(b, i);
                prev_word.clear();
                prev_word.push_str(&sql[start..i]);
                prev = Tok::Other;
                continue;
            }
            _ => {
                i += 1;
                prev = Tok::Other;
                prev_word.clear();
            }
        }
    }
    if values.is_empty() {
        return None;
    }
    out.push_str(&sql[copied..]);
    // Number the holes from the end so earlier offsets stay valid.
    let first = 1;
    for (n, at) in holes.iter().enumerate().rev() {
        out.insert_str(*at, &format!("${}", first + n));
    }
    Some(Shape {
        text: out,
        first,
        values,
    })
}

/// Marks, in place of a previous word, that a top-level list just closed:
/// `(` after `,` then opens the next row of `VALUES (…), (…)`.
const VALUES_ROW: &str = "\0values-row";

fn values_level(prev_word: &str) -> bool {
    prev_word == VALUES_ROW
}

/// A string literal directly followed by another one (`'a' 'b'` continues
/// across a newline in SQL) or typed by a preceding keyword is left alone.
fn followed_by_quote(b: &[u8], end: usize) -> bool {
    b.get(end) == Some(&b'\'')
}

/// The end of an identifier or keyword starting at `start`: letters, digits, `_`, `$` (inside
/// a word, as in `a$b`, it is no dollar quote) and non-ASCII bytes.
pub(crate) fn word_end(b: &[u8], start: usize) -> usize {
    let mut i = start;
    while i < b.len()
        && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$' || b[i] >= 0x80)
    {
        i += 1;
    }
    i
}

/// The end of a quoted token starting at `start` (`'…'`, `"…"`, doubled
/// quotes inside; backslash escapes in an `E'…'` string).
pub(crate) fn skip_quoted(b: &[u8], start: usize, q: u8) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        if b[i] == q {
            if b.get(i + 1) == Some(&q) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        if b[i] == b'\\' && q == b'\'' && start > 0 && matches!(b[start - 1], b'E' | b'e') {
            i += 2;
            continue;
        }
        i += 1;
    }
    b.len()
}

/// The end of a (nested) `/* … */` comment starting at `start`.
pub(crate) fn skip_block_comment(b: &[u8], start: usize) -> usize {
    let mut depth = 0;
    let mut i = start;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// The end of a `$tag$ … $tag$` string at `start` (just past a lone `$`).
pub(crate) fn skip_dollar_quote(b: &[u8], start: usize) -> usize {
    let tag_end = b[start + 1..]
        .iter()
        .position(|&x| !(x.is_ascii_alphanumeric() || x == b'_'))
        .map(|p| start + 1 + p);
    match tag_end {
        Some(e) if b[e] == b'$' => {
            let tag = &b[start..=e];
            let body = e + 1;
            b[body..]
                .windows(tag.len())
                .position(|w| w == tag)
                .map(|p| body + p + tag.len())
                .unwrap_or(b.len())
        }
        _ => start + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(sql: &str) -> (String, Vec<String>) {
        let s = lift(sql).expect("something to lift");
        (
            s.text,
            s.values.into_iter().map(|v| v.into_owned()).collect(),
        )
    }

    #[test]
    fn lifts_key_positions_only() {
        assert_eq!(
            shape("SELECT * FROM orders WHERE customer_id = 42 LIMIT 10"),
            (
                "SELECT * FROM orders WHERE customer_id = $1 LIMIT 10".into(),
                vec!["42".into()]
            )
        );
        assert_eq!(
            shape("UPDATE t SET v = 'it''s' WHERE k IN (1, -2, 3.5e2) ORDER BY 1"),
            (
                "UPDATE t SET v = $1 WHERE k IN ($2, $3, $4) ORDER BY 1".into(),
                vec!["it's".into(), "1".into(), "-2".into(), "3.5e2".into()]
            )
        );
        assert_eq!(
            shape("INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y') RETURNING a"),
            (
                "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4) RETURNING a".into(),
                vec!["1".into(), "x".into(), "2".into(), "y".into()]
            )
        );
    }

    #[test]
    fn leaves_other_literals_and_parameterised_text() {
        assert!(lift("SELECT 1, 'a' FROM t LIMIT 5").is_none());
        assert!(lift("SELECT * FROM t WHERE k = $1").is_none());
        assert!(lift("SELECT * FROM t WHERE d >= 5 AND e <= 'x'").is_none());
        assert!(lift("SELECT f(1, 2)").is_none());
        assert_eq!(
            shape("SELECT * FROM t WHERE k = 7 -- = 8\n AND s = $x$=9$x$"),
            (
                "SELECT * FROM t WHERE k = $1 -- = 8\n AND s = $x$=9$x$".into(),
                vec!["7".into()]
            )
        );
        assert_eq!(
            shape("SELECT * FROM t WHERE d = DATE '2020-01-01' AND k = 3"),
            (
                "SELECT * FROM t WHERE d = DATE '2020-01-01' AND k = $1".into(),
                vec!["3".into()]
            )
        );
    }
}
