//! The console's grammar, as PgBouncer's: `WORD [WORD] [;]` or
//! `SET key (=|TO) value [;]`, case-insensitive, where a WORD is
//! `[0-9a-z_]+` or a double-quoted name (`""` is a quote). A SET value may
//! also be a single-quoted string (`''` is a quote).

/// What PgBouncer allows for the command word, argument and SET value
/// (buffer size minus the terminator).
const MAX_COMMAND: usize = 15;
const MAX_ARG: usize = 63;
const MAX_VALUE: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    /// A command word (lower-cased) and its optional argument (as written,
    /// unquoted).
    Command {
        command: String,
        arg: Option<String>,
    },
    Set {
        key: String,
        value: String,
    },
    /// `RESHARD source TO target` (Weir addition).
    Reshard {
        source: String,
        target: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Matches no form of the grammar ("invalid command").
    Syntax,
    /// A part is longer than PgBouncer accepts ("bad arguments").
    TooLong,
}

pub fn parse(query: &str) -> Result<Statement, ParseError> {
    if let Some(s) = reshard_form(query) {
        let (source, target) = s?;
        return Ok(Statement::Reshard { source, target });
    }
    if let Some(s) = command_form(query) {
        let (command, arg) = s?;
        return Ok(Statement::Command { command, arg });
    }
    if let Some(s) = set_form(query) {
        let (key, value) = s?;
        return Ok(Statement::Set { key, value });
    }
    Err(ParseError::Syntax)
}

type Parsed<T> = Option<Result<T, ParseError>>;

fn command_form(query: &str) -> Parsed<(String, Option<String>)> {
    let mut c = Cursor::new(query);
    c.spaces();
    let command = c.word()?;
    let mut arg = None;
    let mut save = c.pos;
    if c.spaces() > 0 {
        if let Some(w) = c.word() {
            arg = Some(w);
            save = c.pos;
        }
    }
    c.pos = save;
    if !c.end_of_statement() {
        return None;
    }
    if command.chars().count() > MAX_COMMAND
        || arg.as_ref().is_some_and(|a| a.chars().count() > MAX_ARG)
    {
        return Some(Err(ParseError::TooLong));
    }
    Some(Ok((command.to_ascii_lowercase(), arg)))
}

fn reshard_form(query: &str) -> Parsed<(String, String)> {
    let mut c = Cursor::new(query);
    c.spaces();
    if !c.keyword("reshard") || c.spaces() == 0 {
        return None;
    }
    let source = c.word()?;
    if c.spaces() == 0 || !c.keyword("to") || c.spaces() == 0 {
        return None;
    }
    let target = c.word()?;
    if !c.end_of_statement() {
        return None;
    }
    if source.chars().count() > MAX_ARG || target.chars().count() > MAX_ARG {
        return Some(Err(ParseError::TooLong));
    }
    Some(Ok((source, target)))
}

fn set_form(query: &str) -> Parsed<(String, String)> {
    let mut c = Cursor::new(query);
    c.spaces();
    if !c.keyword("set") || c.spaces() == 0 {
        return None;
    }
    let key = c.word()?;
    c.spaces();
    if !(c.eat("=") || c.keyword("to")) {
        return None;
    }
    c.spaces();
    let value = match c.peek() {
        Some('\'') => c.quoted('\'')?,
        _ => c.value_word()?,
    };
    if !c.end_of_statement() {
        return None;
    }
    if key.is_empty() || key.chars().count() > MAX_ARG || value.chars().count() > MAX_VALUE {
        return Some(Err(ParseError::TooLong));
    }
    Some(Ok((key, value)))
}

struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Cursor<'a> {
        Cursor { s, pos: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    /// Skips PgBouncer's whitespace (space, tab, CR, LF); returns how much.
    fn spaces(&mut self) -> usize {
        let n = self
            .rest()
            .bytes()
            .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
            .count();
        self.pos += n;
        n
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    /// A keyword, case-insensitive, not followed by more word characters.
    fn keyword(&mut self, kw: &str) -> bool {
        let rest = self.rest();
        // `get`: the text may have a multi-byte character where the keyword would end.
        let ok = rest
            .get(..kw.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(kw))
            && !rest[kw.len()..].starts_with(is_word_char);
        if ok {
            self.pos += kw.len();
        }
        ok
    }

    fn word(&mut self) -> Option<String> {
        if self.peek() == Some('"') {
            return self.quoted('"');
        }
        self.run(is_word_char)
    }

    /// A SET value without quotes: a word, also allowing `.` so that
    /// `SET reserve_pool_timeout = 0.5` needs no quotes.
    fn value_word(&mut self) -> Option<String> {
        if self.peek() == Some('"') {
            return self.quoted('"');
        }
        self.run(|c| is_word_char(c) || c == '.')
    }

    fn run(&mut self, accept: impl Fn(char) -> bool) -> Option<String> {
        let n: usize = self
            .rest()
            .chars()
            .take_while(|c| accept(*c))
            .map(char::len_utf8)
            .sum();
        if n == 0 {
            return None;
        }
        let w = self.rest()[..n].to_string();
        self.pos += n;
        Some(w)
    }

    /// `q…q` with a doubled `q` standing for itself.
    fn quoted(&mut self, q: char) -> Option<String> {
        let mut out = String::new();
        let mut chars = self.rest().char_indices().skip(1).peekable();
        while let Some((i, c)) = chars.next() {
            if c != q {
                out.push(c);
                continue;
            }
            if let Some((_, next)) = chars.peek() {
                if *next == q {
                    out.push(q);
                    chars.next();
                    continue;
                }
            }
            self.pos += i + c.len_utf8();
            return Some(out);
        }
        None
    }

    /// Optional `;`, whitespace, then nothing.
    fn end_of_statement(&mut self) -> bool {
        self.spaces();
        if self.eat(";") {
            self.spaces();
        }
        self.rest().is_empty()
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(c: &str, arg: Option<&str>) -> Result<Statement, ParseError> {
        Ok(Statement::Command {
            command: c.into(),
            arg: arg.map(Into::into),
        })
    }

    #[test]
    fn commands_are_case_insensitive_with_optional_semicolon() {
        assert_eq!(parse("SHOW POOLS"), cmd("show", Some("POOLS")));
        assert_eq!(parse("  show pools ;  "), cmd("show", Some("pools")));
        assert_eq!(parse("reload;"), cmd("reload", None));
        assert_eq!(parse("Pause app\n"), cmd("pause", Some("app")));
    }

    #[test]
    fn quoted_argument_keeps_its_case_and_quotes() {
        assert_eq!(
            parse(r#"PAUSE "My-DB""x""#),
            cmd("pause", Some(r#"My-DB"x"#))
        );
    }

    #[test]
    fn rejects_what_pgbouncer_rejects() {
        assert_eq!(parse(""), Err(ParseError::Syntax));
        assert_eq!(parse("SHOW POOLS; SHOW STATS"), Err(ParseError::Syntax));
        assert_eq!(parse("SHOW pools stats"), Err(ParseError::Syntax));
        assert_eq!(parse("PAUSE my-db"), Err(ParseError::Syntax));
        assert_eq!(parse(r#"PAUSE "unterminated"#), Err(ParseError::Syntax));
        let long = format!("PAUSE {}", "d".repeat(64));
        assert_eq!(parse(&long), Err(ParseError::TooLong));
    }

    #[test]
    fn reshard_names_source_and_target() {
        let r = |a: &str, b: &str| {
            Ok(Statement::Reshard {
                source: a.into(),
                target: b.into(),
            })
        };
        assert_eq!(parse("RESHARD shop TO shop_v2;"), r("shop", "shop_v2"));
        assert_eq!(parse(" reshard \"My DB\" to b "), r("My DB", "b"));
        assert_eq!(parse("RESHARD CANCEL"), cmd("reshard", Some("CANCEL")));
        assert_eq!(parse("RESHARD shop TO"), Err(ParseError::Syntax));
        assert_eq!(parse("RESHARD shop INTO b"), Err(ParseError::Syntax));
        assert_eq!(parse("RESHARD a TO b c"), Err(ParseError::Syntax));
    }

    #[test]
    fn set_takes_words_numbers_and_strings() {
        let set = |k: &str, v: &str| {
            Ok(Statement::Set {
                key: k.into(),
                value: v.into(),
            })
        };
        assert_eq!(
            parse("SET default_pool_size = 5;"),
            set("default_pool_size", "5")
        );
        assert_eq!(
            parse("set reserve_pool_timeout to 0.5"),
            set("reserve_pool_timeout", "0.5")
        );
        assert_eq!(
            parse("SET server_check_query = 'select ''x'''"),
            set("server_check_query", "select 'x'")
        );
        assert_eq!(parse("SET x ="), Err(ParseError::Syntax));
        assert_eq!(parse("SETx = 1"), Err(ParseError::Syntax));
    }

    #[test]
    fn multibyte_text_where_a_keyword_would_end_is_a_syntax_error() {
        // Found by the admin_command fuzz target: used to panic slicing inside the `�`.
        assert_eq!(parse("\ns\u{fffd}ta"), Err(ParseError::Syntax));
        assert_eq!(parse("s\u{e9}t x = 1"), Err(ParseError::Syntax));
    }
}
