//! COPY into and out of sharded tables, without sockets.
//!
//! * [`parse_copy`] reads a `COPY` statement with PostgreSQL's grammar and
//!   resolves its options to the byte-level settings the data formats use
//!   (PostgreSQL's defaults filled in), refusing the options under which Weir
//!   could not split the data faithfully.
//! * [`RowSplitter`] cuts the client's `COPY … FROM STDIN` data (the payloads
//!   of its CopyData messages, split anywhere) into rows, each with the value
//!   of the sharding-key field, so every row can be forwarded untouched to the
//!   shard its key names.
//! * [`OutMerger`] joins the `COPY … TO STDOUT` streams of several shards into
//!   the one stream a single server would have sent: one header, the rows of
//!   every shard, and for binary format one trailer.
//!
//! The formats are PostgreSQL's (text, CSV and binary, as described under
//! "File Formats" in the documentation of `COPY`), including the rules by
//! which the server itself finds the end of a line: backslash escapes in
//! text, quotes in CSV, and the newline style fixed by the first line.
//!
//! Header lines: the splitter does not emit a text or CSV `HEADER` line as a
//! row. It keeps it ([`RowSplitter::header`]) and the caller is expected to
//! send the statement to the shards unchanged (still with `HEADER`) and the
//! header line as the first CopyData to every shard it opens a COPY on, before
//! any row. Every shard then skips (or, with `HEADER MATCH`, checks) its own
//! copy of the header, exactly as a single server would. A binary file header
//! ([`RowSplitter::binary_header`]) is handled the same way, and the caller
//! ends each shard's binary stream with [`BINARY_TRAILER`].
//!
//! Line ends: `\n`, `\r\n` and `\r` are accepted; as in PostgreSQL the
//! first line's ending fixes the style and a different bare CR or LF later is
//! an error (in text format a backslash-escaped CR or LF is data, in CSV a
//! quoted one is). Rows keep their terminator, so every shard sees the style
//! the client chose. The end-of-data line `\.` ends the data in text and in
//! CSV (unquoted and alone on its line); in text format a `\.` anywhere else
//! is refused, because PostgreSQL would either stop reading there or reject
//! the line, never load it.

use bytes::{Buf, Bytes, BytesMut};
use pg_query::protobuf::{node::Node as N, DefElem, Node};
use thiserror::Error;

/// The end of a binary COPY stream: a tuple field count of -1.
pub const BINARY_TRAILER: [u8; 2] = [0xff, 0xff];

/// The fixed start of a binary COPY stream.
const BINARY_SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Signature, flags and header-extension length.
const BINARY_HEADER_MIN: usize = 19;

/// The format of COPY data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyFormat {
    #[default]
    Text,
    Csv,
    Binary,
}

/// The options of a COPY that decide how its data is cut into rows, with
/// PostgreSQL's defaults for those not given. In binary format only `format`
/// matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    pub format: CopyFormat,
    pub delimiter: u8,
    /// The string that stands for NULL, as it appears in the data.
    pub null: String,
    /// The first line is a header (`HEADER true` or `HEADER MATCH`).
    pub header: bool,
    /// CSV only.
    pub quote: u8,
    /// CSV only; equal to `quote` unless given.
    pub escape: u8,
}

impl CopyOptions {
    /// PostgreSQL's defaults for a format: text uses tab and `\N`; CSV uses
    /// comma, the empty string for NULL, and `"` as quote and escape.
    pub fn new(format: CopyFormat) -> CopyOptions {
        let csv = format == CopyFormat::Csv;
        CopyOptions {
            format,
            delimiter: if csv { b',' } else { b'\t' },
            null: if csv {
                String::new()
            } else {
                "\\N".to_string()
            },
            header: false,
            quote: b'"',
            escape: b'"',
        }
    }
}

impl Default for CopyOptions {
    fn default() -> CopyOptions {
        CopyOptions::new(CopyFormat::Text)
    }
}

/// A `COPY` statement as far as routing needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyStatement {
    /// As written (the parser lower-cases unquoted names); `None` if not
    /// qualified.
    pub schema: Option<String>,
    /// Empty for `COPY (query) TO`.
    pub table: String,
    /// The column list, lower-cased unless quoted; empty if none was given.
    pub columns: Vec<String>,
    /// `COPY … FROM`.
    pub from: bool,
    /// `STDIN`/`STDOUT`; false for a server-side file or `PROGRAM`.
    pub stdio: bool,
    /// `COPY (query) TO`.
    pub query: bool,
    pub options: CopyOptions,
}

/// Reads a COPY statement. `None` when `sql` is not a COPY statement (or does
/// not parse: the server reports syntax errors). `Some(Err(message))` when it
/// is a COPY Weir cannot carry across shards, or one PostgreSQL would reject
/// for its options; the message is meant for the client. A COPY among several
/// statements in one query string is refused, since its data could not be
/// split while the other statements run.
pub fn parse_copy(sql: &str) -> Option<Result<CopyStatement, String>> {
    let parsed = pg_query::parse(sql).ok()?;
    let stmts = &parsed.protobuf.stmts;
    let copy = stmts
        .iter()
        .find_map(|s| match s.stmt.as_ref()?.node.as_ref()? {
            N::CopyStmt(c) => Some(c),
            _ => None,
        })?;
    if stmts.len() > 1 {
        return Some(Err(
            "Weir cannot run COPY in a query string with other statements; send it on its own"
                .to_string(),
        ));
    }
    if copy.is_from && copy.where_clause.is_some() {
        return Some(Err(
            "Weir cannot split COPY FROM with a WHERE clause across shards".to_string(),
        ));
    }
    let options = match copy_options(&copy.options, copy.is_from) {
        Ok(o) => o,
        Err(e) => return Some(Err(e)),
    };
    let (schema, table) = match &copy.relation {
        Some(r) if !r.schemaname.is_empty() => (Some(r.schemaname.clone()), r.relname.clone()),
        Some(r) => (None, r.relname.clone()),
        None => (None, String::new()),
    };
    let columns = copy
        .attlist
        .iter()
        .filter_map(|n| match &n.node {
            Some(N::String(s)) => Some(s.sval.clone()),
            _ => None,
        })
        .collect();
    Some(Ok(CopyStatement {
        schema,
        table,
        columns,
        from: copy.is_from,
        stdio: !copy.is_program && copy.filename.is_empty(),
        query: copy.query.is_some(),
        options,
    }))
}

/// The value of an option the way PostgreSQL's `defGetString` reads it;
/// `None` when the option has no argument.
fn def_string(d: &DefElem) -> Result<Option<String>, String> {
    let Some(node) = d.arg.as_deref().and_then(|a| a.node.as_ref()) else {
        return Ok(None);
    };
    match node {
        N::String(s) => Ok(Some(s.sval.clone())),
        N::Integer(i) => Ok(Some(i.ival.to_string())),
        N::Float(f) => Ok(Some(f.fval.clone())),
        N::Boolean(b) => Ok(Some(b.boolval.to_string())),
        N::AStar(_) => Ok(Some("*".to_string())),
        _ => Err(format!(
            "argument to option \"{}\" must be a string",
            d.defname
        )),
    }
}

fn required_string(d: &DefElem) -> Result<String, String> {
    def_string(d)?.ok_or_else(|| format!("{} requires a parameter", d.defname))
}

/// `HEADER`'s value: a Boolean or `match` (both count as a header line).
fn header_choice(d: &DefElem, is_from: bool) -> Result<bool, String> {
    let bad = || "header requires a Boolean value or \"match\"".to_string();
    match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
        None => Ok(true),
        Some(N::Integer(i)) => match i.ival {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(bad()),
        },
        Some(_) => {
            let s = required_string(d)?.to_ascii_lowercase();
            match s.as_str() {
                "true" | "on" => Ok(true),
                "false" | "off" => Ok(false),
                "match" if is_from => Ok(true),
                "match" => Err("cannot use \"match\" with HEADER in COPY TO".to_string()),
                _ => Err(bad()),
            }
        }
    }
}

/// The single byte a one-character option stands for.
fn one_byte(value: &str, what: &str) -> Result<u8, String> {
    match value.as_bytes() {
        [b] => Ok(*b),
        _ => Err(format!("COPY {what} must be a single one-byte character")),
    }
}

fn copy_options(list: &[Node], is_from: bool) -> Result<CopyOptions, String> {
    let mut seen: Vec<&str> = Vec::new();
    let mut format = CopyFormat::Text;
    let (mut delimiter, mut null, mut quote, mut escape) = (None, None, None, None);
    let mut header = false;
    let mut header_given = false;
    let mut force: Option<&str> = None;
    for n in list {
        let Some(N::DefElem(d)) = &n.node else {
            continue;
        };
        let name = d.defname.as_str();
        if seen.contains(&name) {
            return Err("conflicting or redundant options".to_string());
        }
        seen.push(name);
        match name {
            "format" => {
                format = match required_string(d)?.as_str() {
                    "text" => CopyFormat::Text,
                    "csv" => CopyFormat::Csv,
                    "binary" => CopyFormat::Binary,
                    other => return Err(format!("COPY format \"{other}\" not recognized")),
                }
            }
            "delimiter" => delimiter = Some(required_string(d)?),
            "null" => null = Some(required_string(d)?),
            "quote" => quote = Some(required_string(d)?),
            "escape" => escape = Some(required_string(d)?),
            "header" => {
                header = header_choice(d, is_from)?;
                header_given = true;
            }
            "encoding" => {
                let e = required_string(d)?;
                let norm: String = e
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .collect::<String>()
                    .to_ascii_lowercase();
                if !matches!(norm.as_str(), "utf8" | "unicode" | "sqlascii") {
                    return Err(format!(
                        "Weir can only split COPY data encoded in UTF8; ENCODING '{e}' is not supported"
                    ));
                }
            }
            "force_quote" => {
                if is_from {
                    return Err("COPY force quote only available using COPY TO".to_string());
                }
                force = Some("force quote");
            }
            "force_not_null" | "force_null" => {
                let what = if name == "force_null" {
                    "force null"
                } else {
                    "force not null"
                };
                if !is_from {
                    return Err(format!("COPY {what} only available using COPY FROM"));
                }
                force = Some(what);
            }
            "freeze" | "log_verbosity" => {}
            "on_error" => {
                let v = required_string(d)?.to_ascii_lowercase();
                if v != "stop" {
                    return Err(format!(
                        "Weir cannot split COPY with ON_ERROR {v}: the shards would skip rows independently"
                    ));
                }
            }
            "default" => {
                return Err(
                    "Weir cannot split COPY with the DEFAULT option: a field could stand for the sharding key's default"
                        .to_string(),
                )
            }
            other => return Err(format!("option \"{other}\" not recognized")),
        }
    }

    let mut o = CopyOptions::new(format);
    let csv = format == CopyFormat::Csv;
    if format == CopyFormat::Binary {
        if delimiter.is_some() {
            return Err("cannot specify DELIMITER in BINARY mode".to_string());
        }
        if null.is_some() {
            return Err("cannot specify NULL in BINARY mode".to_string());
        }
        if header_given && header {
            return Err("cannot specify HEADER in BINARY mode".to_string());
        }
    }
    if !csv {
        if quote.is_some() {
            return Err("COPY quote available only in CSV mode".to_string());
        }
        if escape.is_some() {
            return Err("COPY escape available only in CSV mode".to_string());
        }
        if let Some(what) = force {
            return Err(format!("COPY {what} available only in CSV mode"));
        }
    }
    if format == CopyFormat::Binary {
        return Ok(o);
    }
    if let Some(d) = delimiter {
        o.delimiter = one_byte(&d, "delimiter")?;
    }
    if o.delimiter == b'\n' || o.delimiter == b'\r' {
        return Err("COPY delimiter cannot be newline or carriage return".to_string());
    }
    if let Some(n) = null {
        o.null = n;
    }
    if o.null.contains(['\n', '\r']) {
        return Err("COPY null representation cannot use newline or carriage return".to_string());
    }
    if !csv && b"\\.abcdefghijklmnopqrstuvwxyz0123456789".contains(&o.delimiter) {
        return Err(format!(
            "COPY delimiter cannot be \"{}\"",
            char::from(o.delimiter)
        ));
    }
    if csv {
        if let Some(q) = quote {
            o.quote = one_byte(&q, "quote")?;
        }
        o.escape = match escape {
            Some(e) => one_byte(&e, "escape")?,
            None => o.quote,
        };
        if o.delimiter == o.quote {
            return Err("COPY delimiter and quote must be different".to_string());
        }
        if [o.quote, o.escape]
            .iter()
            .any(|&b| b == b'\n' || b == b'\r')
        {
            return Err("COPY quote and escape cannot be newline or carriage return".to_string());
        }
        if o.null.as_bytes().contains(&o.quote) {
            return Err(
                "CSV quote character must not appear in the NULL specification".to_string(),
            );
        }
    }
    if o.null.as_bytes().contains(&o.delimiter) {
        return Err("COPY delimiter must not appear in the NULL specification".to_string());
    }
    o.header = header;
    Ok(o)
}

/// Why COPY data could not be split, with the SQLSTATE for the client's
/// ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct CopyError {
    sqlstate: &'static str,
    message: String,
}

impl CopyError {
    /// `bad_copy_file_format`.
    pub const BAD_COPY_FILE_FORMAT: &'static str = "22P04";
    /// `invalid_text_representation` ("invalid input syntax").
    pub const INVALID_TEXT_REPRESENTATION: &'static str = "22P02";
    /// `program_limit_exceeded`.
    pub const PROGRAM_LIMIT_EXCEEDED: &'static str = "54000";

    /// A malformed COPY stream (22P04).
    pub fn bad_format(message: impl Into<String>) -> CopyError {
        CopyError {
            sqlstate: Self::BAD_COPY_FILE_FORMAT,
            message: message.into(),
        }
    }

    /// A value PostgreSQL would call "invalid input syntax" (22P02), e.g. a
    /// sharding key the caller cannot read.
    pub fn invalid_syntax(message: impl Into<String>) -> CopyError {
        CopyError {
            sqlstate: Self::INVALID_TEXT_REPRESENTATION,
            message: message.into(),
        }
    }

    fn too_large(message: impl Into<String>) -> CopyError {
        CopyError {
            sqlstate: Self::PROGRAM_LIMIT_EXCEEDED,
            message: message.into(),
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn sqlstate(&self) -> &'static str {
        self.sqlstate
    }
}

/// One row of COPY FROM data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The row exactly as the client sent it, line terminator included (a
    /// last line may lack one); in binary format, the tuple (field count and
    /// fields). Ready to forward in a CopyData message.
    pub bytes: Bytes,
    /// The sharding-key field: de-escaped (text) or unquoted (CSV), raw bytes
    /// in binary format; `None` if it is NULL.
    pub key: Option<Vec<u8>>,
}

/// The newline style of text or CSV data, fixed by its first line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Eol {
    Unknown,
    Nl,
    Cr,
    CrNl,
}

/// Where the binary parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bin {
    /// Reading the file header.
    Header,
    /// Expecting a tuple's field count.
    Count,
    /// Expecting the length word of field `field` of `count`.
    Len { count: usize, field: usize },
    /// Expecting `len` bytes of data of field `field`.
    Data {
        count: usize,
        field: usize,
        len: usize,
    },
}

/// Cuts COPY FROM data into rows, incrementally. Feed it the payload of
/// every CopyData message with [`push`](RowSplitter::push), then call
/// [`finish`](RowSplitter::finish) at CopyDone.
///
/// Memory is bounded by the largest row (`max_row`) plus one message, and each
/// byte is examined once however the data is split into messages.
#[derive(Debug)]
pub struct RowSplitter {
    format: CopyFormat,
    delimiter: u8,
    null: Vec<u8>,
    quote: u8,
    escape: u8,
    /// The escape character when it differs from the quote.
    line_escape: Option<u8>,
    /// 0-based field index of the sharding key; `None` to only cut rows.
    key: Option<usize>,
    max_row: usize,
    header_pending: bool,
    header: Option<Bytes>,
    binary_header: Option<Bytes>,
    /// Unconsumed data: the current partial row starts at 0.
    buf: BytesMut,
    /// How much of `buf` has been examined.
    scan: usize,
    eol: Eol,
    in_quote: bool,
    last_was_esc: bool,
    /// Text: the previous byte was an unescaped backslash.
    backslash: bool,
    /// An unquoted CR ends the buffer; the next byte tells CR from CRLF.
    pending_cr: bool,
    /// Text: the line so far is `\.`.
    marker: bool,
    bin: Bin,
    /// Key field of the current binary tuple: (offset, length), or NULL.
    bin_key: Option<Option<(usize, usize)>>,
    /// Rows (lines or tuples) read, header included.
    rows: u64,
    ended: bool,
    /// [`finish`](RowSplitter::finish) was called.
    finished: bool,
}

impl RowSplitter {
    /// A splitter for data in `options`' format whose sharding key is field
    /// `key_column` (0-based). A row longer than `max_row` bytes is an error.
    pub fn new(options: &CopyOptions, key_column: usize, max_row: usize) -> RowSplitter {
        RowSplitter::with_key(options, Some(key_column), max_row)
    }

    fn with_key(options: &CopyOptions, key: Option<usize>, max_row: usize) -> RowSplitter {
        let csv = options.format == CopyFormat::Csv;
        RowSplitter {
            format: options.format,
            delimiter: options.delimiter,
            null: options.null.as_bytes().to_vec(),
            quote: options.quote,
            escape: options.escape,
            line_escape: (csv && options.escape != options.quote).then_some(options.escape),
            key,
            max_row,
            header_pending: options.header && options.format != CopyFormat::Binary,
            header: None,
            binary_header: None,
            buf: BytesMut::new(),
            scan: 0,
            eol: Eol::Unknown,
            in_quote: false,
            last_was_esc: false,
            backslash: false,
            pending_cr: false,
            marker: false,
            bin: Bin::Header,
            bin_key: None,
            rows: 0,
            ended: false,
            finished: false,
        }
    }

    /// The header line (text or CSV with `HEADER`), terminator included, once
    /// read. It is never emitted as a row; send it first to every shard.
    pub fn header(&self) -> Option<&Bytes> {
        self.header.as_ref()
    }

    /// The binary file header (signature, flags, extension), once read. Send
    /// it first to every shard, and end each with [`BINARY_TRAILER`].
    pub fn binary_header(&self) -> Option<&Bytes> {
        self.binary_header.as_ref()
    }

    /// The client marked the end of the data: the `\.` line (text, CSV) or
    /// the trailer (binary). Later text and CSV data is ignored, as
    /// PostgreSQL ignores it; later binary data is an error. (Data that
    /// simply stops at CopyDone does not set this.)
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Takes the payload of one CopyData message and appends the rows it
    /// completes to `out`. The header line and binary header are never
    /// emitted as rows, and are available before the first row is. After an
    /// error the COPY must be abandoned: the splitter's state is unspecified.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Row>) -> Result<(), CopyError> {
        if self.ended || self.finished {
            if self.format == CopyFormat::Binary && !data.is_empty() {
                return Err(after_trailer());
            }
            return Ok(());
        }
        self.buf.extend_from_slice(data);
        match self.format {
            CopyFormat::Binary => self.scan_binary(out),
            _ => self.scan_lines(out),
        }
    }

    /// Ends the data (at CopyDone): a last line without a terminator is a row;
    /// an open CSV quote or a partial binary tuple is an error.
    pub fn finish(&mut self, out: &mut Vec<Row>) -> Result<(), CopyError> {
        if self.ended || self.finished {
            return Ok(());
        }
        self.finished = true;
        if self.format == CopyFormat::Binary {
            return match self.bin {
                Bin::Header => Err(CopyError::bad_format(if self.buf.is_empty() {
                    "COPY file signature not recognized (no binary COPY data)"
                } else {
                    "invalid COPY file header (incomplete)"
                })),
                // PostgreSQL accepts binary data that stops without its
                // trailer at a tuple boundary.
                Bin::Count if self.buf.is_empty() => Ok(()),
                _ => Err(CopyError::bad_format("unexpected EOF in COPY data")),
            };
        }
        if self.in_quote {
            return Err(CopyError::bad_format(format!(
                "unterminated CSV quoted field in row {}",
                self.rows + 1
            )));
        }
        if self.pending_cr {
            self.pending_cr = false;
            if self.eol == Eol::CrNl {
                return Err(self.cr_error());
            }
            self.eol = Eol::Cr;
            let len = self.buf.len();
            self.complete_line(len, 1, out)?;
        } else if !self.buf.is_empty() {
            let len = self.buf.len();
            self.complete_line(len, 0, out)?;
        }
        Ok(())
    }

    fn too_large(&self) -> CopyError {
        CopyError::too_large(format!(
            "COPY row {} is larger than Weir's limit of {} bytes",
            self.rows + 1,
            self.max_row
        ))
    }

    fn cr_error(&self) -> CopyError {
        CopyError::bad_format(if self.format == CopyFormat::Csv {
            format!(
                "unquoted carriage return found in data in row {}; use a quoted CSV field to represent carriage return",
                self.rows + 1
            )
        } else {
            format!(
                "literal carriage return found in data in row {}; use \"\\r\" to represent carriage return",
                self.rows + 1
            )
        })
    }

    fn nl_error(&self) -> CopyError {
        CopyError::bad_format(if self.format == CopyFormat::Csv {
            format!(
                "unquoted newline found in data in row {}; use a quoted CSV field to represent newline",
                self.rows + 1
            )
        } else {
            format!(
                "literal newline found in data in row {}; use \"\\n\" to represent newline",
                self.rows + 1
            )
        })
    }

    /// Text and CSV: finds line ends from `scan` on, the way PostgreSQL's
    /// CopyReadLineText does.
    fn scan_lines(&mut self, out: &mut Vec<Row>) -> Result<(), CopyError> {
        let csv = self.format == CopyFormat::Csv;
        while self.scan < self.buf.len() && !self.ended {
            let i = self.scan;
            let c = self.buf[i];
            if self.pending_cr {
                self.pending_cr = false;
                if c == b'\n' {
                    if self.eol == Eol::Unknown {
                        self.eol = Eol::CrNl;
                    }
                    self.complete_line(i + 1, 2, out)?;
                } else {
                    if self.eol == Eol::CrNl {
                        return Err(self.cr_error());
                    }
                    self.eol = Eol::Cr;
                    // The CR ended the line; `c` starts the next one.
                    self.complete_line(i, 1, out)?;
                }
                continue;
            }
            if i >= self.max_row {
                return Err(self.too_large());
            }
            if csv {
                if self.in_quote && self.line_escape == Some(c) {
                    self.last_was_esc = !self.last_was_esc;
                }
                if c == self.quote && !self.last_was_esc {
                    self.in_quote = !self.in_quote;
                }
                if self.line_escape != Some(c) {
                    self.last_was_esc = false;
                }
                if self.in_quote {
                    self.scan += 1;
                    continue;
                }
            } else {
                if self.backslash {
                    // Whatever follows a backslash is data, even a newline.
                    self.backslash = false;
                    if c == b'.' {
                        if i != 1 {
                            return Err(CopyError::bad_format(format!(
                                "end-of-copy marker is not alone on its line in row {}",
                                self.rows + 1
                            )));
                        }
                        self.marker = true;
                    }
                    self.scan += 1;
                    continue;
                }
                if self.marker && c != b'\n' && c != b'\r' {
                    return Err(CopyError::bad_format("end-of-copy marker corrupt"));
                }
                if c == b'\\' {
                    self.backslash = true;
                    self.scan += 1;
                    continue;
                }
            }
            match c {
                b'\r' => match self.eol {
                    Eol::Nl => return Err(self.cr_error()),
                    Eol::Cr => self.complete_line(i + 1, 1, out)?,
                    Eol::Unknown | Eol::CrNl => {
                        self.pending_cr = true;
                        self.scan += 1;
                    }
                },
                b'\n' => match self.eol {
                    Eol::Cr | Eol::CrNl => return Err(self.nl_error()),
                    Eol::Unknown | Eol::Nl => {
                        self.eol = Eol::Nl;
                        self.complete_line(i + 1, 1, out)?;
                    }
                },
                _ => self.scan += 1,
            }
        }
        if self.ended {
            self.buf.clear();
            self.scan = 0;
        }
        Ok(())
    }

    /// Takes `buf[..end]`, whose last `term` bytes are the line terminator, as
    /// one line: the end marker, the header, or a row.
    fn complete_line(
        &mut self,
        end: usize,
        term: usize,
        out: &mut Vec<Row>,
    ) -> Result<(), CopyError> {
        if end > self.max_row {
            return Err(self.too_large());
        }
        let bytes = self.buf.split_to(end).freeze();
        self.scan = 0;
        self.in_quote = false;
        self.last_was_esc = false;
        self.backslash = false;
        self.marker = false;
        self.rows += 1;
        let content = &bytes[..bytes.len() - term];
        if content == b"\\." {
            self.ended = true;
            return Ok(());
        }
        if self.header_pending {
            self.header_pending = false;
            self.header = Some(bytes);
            return Ok(());
        }
        let key = match self.key {
            None => None,
            Some(k) => {
                let field = if self.format == CopyFormat::Csv {
                    csv_field(
                        content,
                        self.delimiter,
                        self.quote,
                        self.escape,
                        &self.null,
                        k,
                    )
                } else {
                    text_field(content, self.delimiter, &self.null, k)
                };
                match field {
                    Field::Value(v) => Some(v),
                    Field::Null => None,
                    Field::Missing(count) => return Err(self.missing(k, count)),
                    Field::Unterminated => {
                        return Err(CopyError::bad_format(format!(
                            "unterminated CSV quoted field in row {}",
                            self.rows
                        )))
                    }
                }
            }
        };
        out.push(Row { bytes, key });
        Ok(())
    }

    fn missing(&self, key: usize, fields: usize) -> CopyError {
        CopyError::bad_format(format!(
            "missing data for column: row {} has no field {} (the sharding key), only {}",
            self.rows,
            key + 1,
            fields
        ))
    }

    /// Binary: reads the header, then tuples, from where the last push
    /// stopped.
    fn scan_binary(&mut self, out: &mut Vec<Row>) -> Result<(), CopyError> {
        loop {
            let avail = self.buf.len() - self.scan;
            match self.bin {
                Bin::Header => {
                    let n = self.buf.len().min(BINARY_SIGNATURE.len());
                    if self.buf[..n] != BINARY_SIGNATURE[..n] {
                        return Err(CopyError::bad_format("COPY file signature not recognized"));
                    }
                    if self.buf.len() < BINARY_HEADER_MIN {
                        return Ok(());
                    }
                    let flags = read_i32(&self.buf[11..15]);
                    if flags & (1 << 16) != 0 {
                        return Err(CopyError::bad_format(
                            "invalid COPY file header (WITH OIDS): Weir cannot split binary COPY data with OIDs",
                        ));
                    }
                    if flags as u32 & 0xffff_0000 != 0 {
                        return Err(CopyError::bad_format(
                            "unrecognized critical flags in COPY file header",
                        ));
                    }
                    let ext = read_i32(&self.buf[15..19]);
                    let Ok(ext) = usize::try_from(ext) else {
                        return Err(CopyError::bad_format(
                            "invalid COPY file header (wrong length)",
                        ));
                    };
                    let total = BINARY_HEADER_MIN.saturating_add(ext);
                    if total > self.max_row.max(BINARY_HEADER_MIN) {
                        return Err(CopyError::too_large(format!(
                            "binary COPY header extension of {ext} bytes is larger than Weir's limit"
                        )));
                    }
                    if self.buf.len() < total {
                        return Ok(());
                    }
                    self.binary_header = Some(self.buf.split_to(total).freeze());
                    self.scan = 0;
                    self.bin = Bin::Count;
                }
                Bin::Count => {
                    if avail < 2 {
                        return Ok(());
                    }
                    let count = i16::from_be_bytes([self.buf[0], self.buf[1]]);
                    if count == -1 {
                        self.buf.advance(2);
                        self.ended = true;
                        if !self.buf.is_empty() {
                            return Err(after_trailer());
                        }
                        return Ok(());
                    }
                    let Ok(count) = usize::try_from(count) else {
                        return Err(CopyError::bad_format(format!(
                            "invalid field count {count} in binary COPY row {}",
                            self.rows + 1
                        )));
                    };
                    self.scan = 2;
                    self.bin_key = None;
                    self.bin = Bin::Len { count, field: 0 };
                    if count == 0 {
                        self.complete_tuple(0, out)?;
                    }
                }
                Bin::Len { count, field } => {
                    if avail < 4 {
                        return Ok(());
                    }
                    let len = read_i32(&self.buf[self.scan..self.scan + 4]);
                    self.scan += 4;
                    if len == -1 {
                        if self.key == Some(field) {
                            self.bin_key = Some(None);
                        }
                        self.next_field(count, field, out)?;
                    } else {
                        let Ok(len) = usize::try_from(len) else {
                            return Err(CopyError::bad_format(format!(
                                "invalid field size in binary COPY row {}",
                                self.rows + 1
                            )));
                        };
                        if self.scan.saturating_add(len) > self.max_row {
                            return Err(self.too_large());
                        }
                        self.bin = Bin::Data { count, field, len };
                    }
                }
                Bin::Data { count, field, len } => {
                    if avail < len {
                        return Ok(());
                    }
                    if self.key == Some(field) {
                        self.bin_key = Some(Some((self.scan, len)));
                    }
                    self.scan += len;
                    self.next_field(count, field, out)?;
                }
            }
            if self.scan > self.max_row {
                return Err(self.too_large());
            }
        }
    }

    fn next_field(
        &mut self,
        count: usize,
        field: usize,
        out: &mut Vec<Row>,
    ) -> Result<(), CopyError> {
        if field + 1 == count {
            self.complete_tuple(count, out)
        } else {
            self.bin = Bin::Len {
                count,
                field: field + 1,
            };
            Ok(())
        }
    }

    fn complete_tuple(&mut self, count: usize, out: &mut Vec<Row>) -> Result<(), CopyError> {
        self.rows += 1;
        let key = match self.key {
            None => None,
            Some(k) => match self.bin_key {
                Some(Some((at, len))) => Some(self.buf[at..at + len].to_vec()),
                Some(None) => None,
                None => return Err(self.missing(k, count)),
            },
        };
        let bytes = self.buf.split_to(self.scan).freeze();
        self.scan = 0;
        self.bin = Bin::Count;
        out.push(Row { bytes, key });
        Ok(())
    }
}

fn after_trailer() -> CopyError {
    CopyError::bad_format("received copy data after EOF marker")
}

fn read_i32(b: &[u8]) -> i32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    i32::from_be_bytes(w)
}

/// The sharding-key field of one line.
#[derive(Debug, PartialEq, Eq)]
enum Field {
    Value(Vec<u8>),
    Null,
    /// The line has only this many fields.
    Missing(usize),
    Unterminated,
}

/// Field `k` of a text-format line (terminator removed).
fn text_field(line: &[u8], delimiter: u8, null: &[u8], k: usize) -> Field {
    let mut field = 0;
    let mut start = 0;
    let mut i = 0;
    let mut end = None;
    while i < line.len() {
        let c = line[i];
        if c == b'\\' {
            i += 2;
            continue;
        }
        if c == delimiter {
            if field == k {
                end = Some(i);
                break;
            }
            field += 1;
            start = i + 1;
        }
        i += 1;
    }
    if field != k {
        return Field::Missing(field + 1);
    }
    let raw = &line[start..end.unwrap_or(line.len())];
    if raw == null {
        return Field::Null;
    }
    Field::Value(text_unescape(raw))
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

/// Undoes text-format backslash escapes, as PostgreSQL's
/// CopyReadAttributesText does.
fn text_unescape(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        // A backslash at the end of the line is dropped.
        let Some(&e) = raw.get(i) else {
            break;
        };
        i += 1;
        let v = match e {
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                (v & 0xff) as u8
            }
            b'x' => match raw.get(i).copied().and_then(hex_digit) {
                Some(h) => {
                    i += 1;
                    match raw.get(i).copied().and_then(hex_digit) {
                        Some(l) => {
                            i += 1;
                            h * 16 + l
                        }
                        None => h,
                    }
                }
                None => b'x',
            },
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'v' => 11,
            other => other,
        };
        out.push(v);
    }
    out
}

/// Field `k` of a CSV line (terminator removed), as PostgreSQL's
/// CopyReadAttributesCSV reads it.
fn csv_field(line: &[u8], delimiter: u8, quote: u8, escape: u8, null: &[u8], k: usize) -> Field {
    let mut i = 0;
    let mut field = 0;
    loop {
        let start = i;
        let mut value = Vec::new();
        let mut saw_quote = false;
        let mut found_delim = false;
        let mut end;
        'field: loop {
            // Outside quotes.
            loop {
                end = i;
                let Some(&c) = line.get(i) else {
                    break 'field;
                };
                i += 1;
                if c == delimiter {
                    found_delim = true;
                    break 'field;
                }
                if c == quote {
                    saw_quote = true;
                    break;
                }
                if field == k {
                    value.push(c);
                }
            }
            // Inside quotes.
            loop {
                let Some(&c) = line.get(i) else {
                    return Field::Unterminated;
                };
                i += 1;
                if c == escape {
                    if let Some(&next) = line.get(i) {
                        if next == escape || next == quote {
                            if field == k {
                                value.push(next);
                            }
                            i += 1;
                            continue;
                        }
                    }
                }
                if c == quote {
                    break;
                }
                if field == k {
                    value.push(c);
                }
            }
        }
        if field == k {
            if !saw_quote && &line[start..end] == null {
                return Field::Null;
            }
            return Field::Value(value);
        }
        if !found_delim {
            return Field::Missing(field + 1);
        }
        field += 1;
    }
}

/// Joins the `COPY … TO STDOUT` data of several shards into one stream for
/// the client: the header line (text or CSV with `HEADER`) or binary file
/// header once, every shard's rows, and for binary format one trailer at the
/// end.
///
/// It works on whole rows, so the shards' CopyData payloads may be fed in
/// any interleaving and split anywhere: each call returns only complete rows
/// (and the header before the first of them), which can be sent to the client
/// as they come.
#[derive(Debug)]
pub struct OutMerger {
    format: CopyFormat,
    shards: Vec<RowSplitter>,
    finished: Vec<bool>,
    header_sent: bool,
    rows: Vec<Row>,
}

impl OutMerger {
    /// A merger for `shards` streams of COPY TO data in `options`' format; a
    /// row longer than `max_row` bytes is an error.
    pub fn new(options: &CopyOptions, shards: usize, max_row: usize) -> OutMerger {
        OutMerger {
            format: options.format,
            shards: (0..shards)
                .map(|_| RowSplitter::with_key(options, None, max_row))
                .collect(),
            finished: vec![false; shards],
            header_sent: false,
            rows: Vec::new(),
        }
    }

    /// Takes one CopyData payload from shard `shard` (0-based) and appends
    /// what to forward to the client to `out`.
    pub fn push(&mut self, shard: usize, data: &[u8], out: &mut Vec<u8>) -> Result<(), CopyError> {
        let mut rows = std::mem::take(&mut self.rows);
        let res = self.splitter(shard).and_then(|s| s.push(data, &mut rows));
        self.emit(shard, &mut rows, out);
        self.rows = rows;
        res
    }

    /// Shard `shard` sent CopyDone: appends its last row, if it lacked a line
    /// end, to `out`. Errors if its data stopped mid-row.
    pub fn finish_shard(&mut self, shard: usize, out: &mut Vec<u8>) -> Result<(), CopyError> {
        let mut rows = std::mem::take(&mut self.rows);
        let res = self.splitter(shard).and_then(|s| s.finish(&mut rows));
        self.emit(shard, &mut rows, out);
        self.rows = rows;
        if let Some(f) = self.finished.get_mut(shard) {
            *f = true;
        }
        res
    }

    /// Every shard is done (shards not yet finished are finished now):
    /// appends the end of the stream (the binary trailer) to `out`.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), CopyError> {
        for shard in 0..self.shards.len() {
            if !self.finished[shard] {
                self.finish_shard(shard, out)?;
            }
        }
        if self.format == CopyFormat::Binary && self.header_sent {
            out.extend_from_slice(&BINARY_TRAILER);
        }
        Ok(())
    }

    fn splitter(&mut self, shard: usize) -> Result<&mut RowSplitter, CopyError> {
        let n = self.shards.len();
        self.shards
            .get_mut(shard)
            .ok_or_else(|| CopyError::bad_format(format!("COPY data from shard {shard} of {n}")))
    }

    fn emit(&mut self, shard: usize, rows: &mut Vec<Row>, out: &mut Vec<u8>) {
        if !self.header_sent {
            if let Some(s) = self.shards.get(shard) {
                if let Some(h) = s.header().or(s.binary_header()) {
                    out.extend_from_slice(h);
                    self.header_sent = true;
                }
            }
        }
        for row in rows.drain(..) {
            out.extend_from_slice(&row.bytes);
            if self.format != CopyFormat::Binary && !row.bytes.ends_with(b"\n") {
                out.push(b'\n');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn stmt(sql: &str) -> CopyStatement {
        match parse_copy(sql) {
            Some(Ok(s)) => s,
            other => panic!("{sql}: {other:?}"),
        }
    }

    fn refused(sql: &str) -> String {
        match parse_copy(sql) {
            Some(Err(e)) => e,
            other => panic!("{sql}: expected an error, got {other:?}"),
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        rows: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        header: Option<Vec<u8>>,
        binary_header: Option<Vec<u8>>,
        ended: bool,
    }

    /// Feeds `chunks` in order, then finishes.
    fn feed_chunks(
        o: &CopyOptions,
        key: usize,
        max: usize,
        chunks: &[&[u8]],
    ) -> Result<Outcome, CopyError> {
        let mut s = RowSplitter::new(o, key, max);
        let mut rows = Vec::new();
        for c in chunks {
            s.push(c, &mut rows)?;
        }
        s.finish(&mut rows)?;
        Ok(Outcome {
            rows: rows
                .into_iter()
                .map(|r| (r.bytes.to_vec(), r.key))
                .collect(),
            header: s.header().map(|h| h.to_vec()),
            binary_header: s.binary_header().map(|h| h.to_vec()),
            ended: s.ended(),
        })
    }

    fn feed(o: &CopyOptions, key: usize, data: &[u8]) -> Result<Outcome, CopyError> {
        feed_chunks(o, key, MAX, &[data])
    }

    /// The outcome of `data` unsplit, after checking that it is the same
    /// split at every position, at every pair of positions (short inputs),
    /// and in 1-byte pieces.
    fn feed_all_splits(o: &CopyOptions, key: usize, data: &[u8]) -> Result<Outcome, CopyError> {
        let whole = feed(o, key, data);
        for i in 0..=data.len() {
            let (a, b) = data.split_at(i);
            assert_eq!(feed_chunks(o, key, MAX, &[a, b]), whole, "split at {i}");
            if data.len() <= 64 {
                for j in i..=data.len() {
                    let parts = [&data[..i], &data[i..j], &data[j..]];
                    assert_eq!(feed_chunks(o, key, MAX, &parts), whole, "split at {i}, {j}");
                }
            }
        }
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(feed_chunks(o, key, MAX, &bytes), whole, "1-byte pieces");
        whole
    }

    fn keys(out: &Outcome) -> Vec<Option<&[u8]>> {
        out.rows.iter().map(|(_, k)| k.as_deref()).collect()
    }

    fn rows(out: &Outcome) -> Vec<&[u8]> {
        out.rows.iter().map(|(r, _)| r.as_slice()).collect()
    }

    fn csv() -> CopyOptions {
        CopyOptions::new(CopyFormat::Csv)
    }

    fn text() -> CopyOptions {
        CopyOptions::new(CopyFormat::Text)
    }

    // ---- parse_copy ----

    #[test]
    fn parses_plain_copy_from_stdin() {
        let s = stmt("COPY t FROM STDIN");
        assert_eq!(
            s,
            CopyStatement {
                schema: None,
                table: "t".into(),
                columns: vec![],
                from: true,
                stdio: true,
                query: false,
                options: CopyOptions::default(),
            }
        );
        assert_eq!(s.options.delimiter, b'\t');
        assert_eq!(s.options.null, "\\N");
    }

    #[test]
    fn parses_names_columns_and_targets() {
        let s = stmt(r#"copy Public."Orders" (Id, "Key", b) from stdin"#);
        assert_eq!(s.schema.as_deref(), Some("public"));
        assert_eq!(s.table, "Orders");
        assert_eq!(s.columns, vec!["id", "Key", "b"]);
        let s = stmt("COPY t TO STDOUT");
        assert!(!s.from && s.stdio && !s.query);
        let s = stmt("COPY (SELECT 1) TO STDOUT WITH (FORMAT csv)");
        assert!(s.query && !s.from && s.table.is_empty());
        assert_eq!(s.options.format, CopyFormat::Csv);
        assert!(!stmt("COPY t FROM '/tmp/x'").stdio);
        assert!(!stmt("COPY t FROM PROGRAM 'cat'").stdio);
        assert!(!stmt("COPY t TO '/tmp/x'").stdio);
    }

    #[test]
    fn not_a_copy_is_none() {
        assert_eq!(parse_copy("SELECT 1"), None);
        assert_eq!(parse_copy("INSERT INTO t VALUES (1)"), None);
        assert_eq!(parse_copy("COPY t FROM"), None); // syntax error
        assert_eq!(parse_copy(""), None);
    }

    #[test]
    fn copy_among_other_statements_is_refused() {
        assert!(refused("COPY t FROM STDIN; SELECT 1").contains("on its own"));
        assert!(refused("SELECT 1; COPY t TO STDOUT").contains("on its own"));
    }

    #[test]
    fn parses_csv_options() {
        let o = stmt(
            "COPY t FROM STDIN (FORMAT csv, HEADER, DELIMITER ';', NULL 'n', QUOTE '''', ESCAPE '\\', FORCE_NOT_NULL (a), FORCE_NULL (b), ENCODING 'UTF-8', FREEZE)",
        )
        .options;
        assert_eq!(
            o,
            CopyOptions {
                format: CopyFormat::Csv,
                delimiter: b';',
                null: "n".into(),
                header: true,
                quote: b'\'',
                escape: b'\\',
            }
        );
        let o = stmt("COPY t FROM STDIN (FORMAT csv)").options;
        assert_eq!(o, csv());
        assert_eq!(
            (o.delimiter, o.null.as_str(), o.quote, o.escape),
            (b',', "", b'"', b'"')
        );
        let o = stmt("COPY t FROM STDIN (FORMAT csv, QUOTE '|')").options;
        assert_eq!((o.quote, o.escape), (b'|', b'|'));
        let o = stmt("COPY t TO STDOUT (FORMAT csv, FORCE_QUOTE *)").options;
        assert_eq!(o.format, CopyFormat::Csv);
        let o = stmt("COPY t TO STDOUT (FORMAT csv, FORCE_QUOTE (a, b))").options;
        assert_eq!(o.format, CopyFormat::Csv);
    }

    #[test]
    fn parses_old_style_options() {
        let o = stmt("COPY t FROM STDIN WITH CSV HEADER").options;
        assert_eq!((o.format, o.header), (CopyFormat::Csv, true));
        let o = stmt(
            "COPY t FROM STDIN WITH CSV DELIMITER AS '|' NULL AS 'nil' QUOTE AS '''' ESCAPE AS '\\' FORCE NOT NULL a",
        )
        .options;
        assert_eq!(
            (o.delimiter, o.null.as_str(), o.quote, o.escape),
            (b'|', "nil", b'\'', b'\\')
        );
        let o = stmt("COPY t TO STDOUT WITH CSV FORCE QUOTE *").options;
        assert_eq!(o.format, CopyFormat::Csv);
        assert_eq!(
            stmt("COPY BINARY t FROM STDIN").options.format,
            CopyFormat::Binary
        );
        assert_eq!(
            stmt("COPY t FROM STDIN BINARY").options.format,
            CopyFormat::Binary
        );
        assert_eq!(
            stmt("COPY t FROM STDIN WITH BINARY").options.format,
            CopyFormat::Binary
        );
        assert_eq!(
            stmt("COPY t TO STDOUT USING DELIMITERS ','")
                .options
                .delimiter,
            b','
        );
        let o = stmt("COPY t FROM STDIN DELIMITER '|' NULL ''").options;
        assert_eq!(
            (o.format, o.delimiter, o.null.as_str()),
            (CopyFormat::Text, b'|', "")
        );
    }

    #[test]
    fn parses_header_values() {
        for (v, want) in [
            ("", true),
            (" true", true),
            (" false", false),
            (" on", true),
            (" off", false),
            (" 1", true),
            (" 0", false),
            (" match", true),
            (" 'MATCH'", true),
            (" 'On'", true),
        ] {
            let sql = format!("COPY t FROM STDIN (FORMAT csv, HEADER{v})");
            assert_eq!(stmt(&sql).options.header, want, "{sql}");
        }
        assert!(stmt("COPY t FROM STDIN (HEADER)").options.header);
        assert!(refused("COPY t FROM STDIN (HEADER 2)").contains("Boolean"));
        assert!(refused("COPY t FROM STDIN (HEADER 'maybe')").contains("Boolean"));
        assert!(refused("COPY t TO STDOUT (HEADER match)").contains("match"));
    }

    #[test]
    fn parses_formats_exactly() {
        assert_eq!(stmt("COPY t FROM STDIN (FORMAT text)").options, text());
        assert_eq!(stmt("COPY t FROM STDIN (FORMAT 'text')").options, text());
        assert_eq!(
            stmt("COPY t FROM STDIN (FORMAT binary)").options.format,
            CopyFormat::Binary
        );
        assert!(refused("COPY t FROM STDIN (FORMAT 'CSV')").contains("not recognized"));
        assert!(refused("COPY t FROM STDIN (FORMAT xml)").contains("not recognized"));
        assert!(refused("COPY t FROM STDIN (FORMAT)").contains("requires a parameter"));
    }

    #[test]
    fn refuses_what_cannot_be_split() {
        assert!(refused("COPY t FROM STDIN WHERE a > 1").contains("WHERE"));
        assert!(refused("COPY t FROM STDIN (ENCODING 'LATIN1')").contains("UTF8"));
        assert!(refused("COPY t FROM STDIN (ENCODING 'SJIS')").contains("UTF8"));
        assert!(stmt("COPY t FROM STDIN (ENCODING 'sql_ascii')").from);
        assert!(stmt("COPY t FROM STDIN WITH ENCODING 'utf8'").from);
        assert!(refused("COPY t FROM STDIN (ON_ERROR ignore)").contains("ON_ERROR"));
        assert!(stmt("COPY t FROM STDIN (ON_ERROR stop)").from);
        assert!(refused("COPY t FROM STDIN (DEFAULT 'd')").contains("DEFAULT"));
        assert!(refused("COPY t FROM STDIN (OIDS)").contains("not recognized"));
        assert!(refused("COPY t FROM STDIN (BOGUS 1)").contains("not recognized"));
    }

    #[test]
    fn refuses_bad_option_combinations() {
        for (sql, msg) in [
            (
                "COPY t FROM STDIN (DELIMITER ',', DELIMITER ';')",
                "redundant",
            ),
            ("COPY t FROM STDIN (DELIMITER '||')", "one-byte"),
            ("COPY t FROM STDIN (DELIMITER 'é')", "one-byte"),
            ("COPY t FROM STDIN (DELIMITER E'\\n')", "newline"),
            ("COPY t FROM STDIN (DELIMITER '\\')", "cannot be"),
            ("COPY t FROM STDIN (DELIMITER 'a')", "cannot be"),
            ("COPY t FROM STDIN (NULL E'a\\nb')", "newline"),
            ("COPY t FROM STDIN (NULL 'a\tb')", "NULL specification"),
            ("COPY t FROM STDIN (QUOTE '\"')", "only in CSV"),
            ("COPY t FROM STDIN (ESCAPE '\\')", "only in CSV"),
            ("COPY t FROM STDIN (FORCE_NULL (a))", "only in CSV"),
            ("COPY t FROM STDIN (FORMAT csv, QUOTE '')", "one-byte"),
            ("COPY t FROM STDIN (FORMAT csv, ESCAPE 'ab')", "one-byte"),
            (
                "COPY t FROM STDIN (FORMAT csv, QUOTE ',')",
                "must be different",
            ),
            (
                "COPY t FROM STDIN (FORMAT csv, NULL '\"')",
                "quote character",
            ),
            ("COPY t FROM STDIN (FORMAT csv, FORCE_QUOTE *)", "COPY TO"),
            (
                "COPY t TO STDOUT (FORMAT csv, FORCE_NOT_NULL (a))",
                "COPY FROM",
            ),
            ("COPY t FROM STDIN (FORMAT binary, DELIMITER ',')", "BINARY"),
            ("COPY t FROM STDIN (FORMAT binary, NULL '')", "BINARY"),
            ("COPY t FROM STDIN (FORMAT binary, HEADER)", "BINARY"),
            (
                "COPY t FROM STDIN (FORMAT binary, QUOTE '\"')",
                "only in CSV",
            ),
        ] {
            let e = refused(sql);
            assert!(e.contains(msg), "{sql}: {e}");
        }
        // Allowed in CSV: letters as delimiter.
        assert_eq!(
            stmt("COPY t FROM STDIN (FORMAT csv, DELIMITER 'x')")
                .options
                .delimiter,
            b'x'
        );
        assert!(
            !stmt("COPY t FROM STDIN (FORMAT binary, HEADER false)")
                .options
                .header
        );
    }

    // ---- text ----

    #[test]
    fn text_rows_and_keys() {
        let data = b"1\ta\n2\tb\n\\N\tc\n";
        let out = feed_all_splits(&text(), 0, data).unwrap();
        assert_eq!(rows(&out), vec![&b"1\ta\n"[..], b"2\tb\n", b"\\N\tc\n"]);
        assert_eq!(keys(&out), vec![Some(&b"1"[..]), Some(b"2"), None]);
        assert!(!out.ended && out.header.is_none());
        let out = feed_all_splits(&text(), 1, data).unwrap();
        assert_eq!(keys(&out), vec![Some(&b"a"[..]), Some(b"b"), Some(b"c")]);
    }

    #[test]
    fn text_escapes_in_keys() {
        let data =
            b"a\\tb\\nc\\\\d\\N\\101\\x41\\x4a\\xg\\q\\7\\0101\tz\n\\\\N\tz\n\\N\\N\tz\n\t\n";
        let out = feed_all_splits(&text(), 0, data).unwrap();
        assert_eq!(
            keys(&out),
            vec![
                Some(&b"a\tb\nc\\dNAAJxgq\x07\x081"[..]),
                Some(b"\\N"),
                Some(b"NN"),
                Some(b""),
            ]
        );
        // Every escape letter.
        let out = feed(&text(), 0, b"\\b\\f\\n\\r\\t\\v\n").unwrap();
        assert_eq!(keys(&out), vec![Some(&b"\x08\x0c\n\r\t\x0b"[..])]);
        // Octal wraps like PostgreSQL's (\777 & 0377).
        let out = feed(&text(), 0, b"\\777\n").unwrap();
        assert_eq!(keys(&out), vec![Some(&b"\xff"[..])]);
    }

    #[test]
    fn text_escaped_delimiter_and_newline_stay_in_the_field() {
        // `\<tab>` is a literal tab, `\<newline>` a literal newline: neither
        // splits.
        let data = b"a\\\tb\tk1\nc\\\nd\tk2\n";
        let out = feed_all_splits(&text(), 1, data).unwrap();
        assert_eq!(rows(&out), vec![&b"a\\\tb\tk1\n"[..], b"c\\\nd\tk2\n"]);
        assert_eq!(keys(&out), vec![Some(&b"k1"[..]), Some(b"k2")]);
        let out = feed(&text(), 0, data).unwrap();
        assert_eq!(keys(&out), vec![Some(&b"a\tb"[..]), Some(b"c\nd")]);
    }

    #[test]
    fn text_custom_delimiter_and_null() {
        let o = stmt("COPY t FROM STDIN (DELIMITER '|', NULL 'nil')").options;
        let data = b"x|nil|3\ny|\\nil|4\nz||5\n";
        let out = feed_all_splits(&o, 1, data).unwrap();
        assert_eq!(keys(&out), vec![None, Some(&b"\nil"[..]), Some(b"")]);
        let out = feed(&o, 2, data).unwrap();
        assert_eq!(keys(&out), vec![Some(&b"3"[..]), Some(b"4"), Some(b"5")]);
        // The empty string as NULL.
        let o = stmt("COPY t FROM STDIN (NULL '')").options;
        let out = feed(&o, 0, b"\tx\n\\N\tx\n").unwrap();
        assert_eq!(keys(&out), vec![None, Some(&b"N"[..])]);
    }

    #[test]
    fn text_header_is_kept_apart() {
        let o = stmt("COPY t FROM STDIN (HEADER)").options;
        let data = b"id\tname\n1\ta\n2\tb\n";
        let out = feed_all_splits(&o, 0, data).unwrap();
        assert_eq!(out.header.as_deref(), Some(&b"id\tname\n"[..]));
        assert_eq!(keys(&out), vec![Some(&b"1"[..]), Some(b"2")]);
        // A header alone, even with too few fields, is no row.
        let out = feed(&o, 5, b"h\n").unwrap();
        assert!(out.rows.is_empty());
        assert_eq!(out.header.as_deref(), Some(&b"h\n"[..]));
        let out = feed(&o, 0, b"").unwrap();
        assert!(out.rows.is_empty() && out.header.is_none());
    }

    #[test]
    fn text_end_marker() {
        let data = b"1\ta\n\\.\n2\tb\n";
        let out = feed_all_splits(&text(), 0, data).unwrap();
        assert_eq!(keys(&out), vec![Some(&b"1"[..])]);
        assert!(out.ended);
        // Data after the marker in later messages is ignored too.
        let mut s = RowSplitter::new(&text(), 0, MAX);
        let mut v = Vec::new();
        s.push(b"1\n\\.\n", &mut v).unwrap();
        assert!(s.ended());
        s.push(b"2\n", &mut v).unwrap();
        s.finish(&mut v).unwrap();
        assert_eq!(v.len(), 1);
        // At the very end, with or without its newline, and with CRLF.
        for data in [&b"1\n\\."[..], b"1\n\\.\n", b"1\r\n\\.\r\n", b"1\r\\.\r"] {
            let out = feed_all_splits(&text(), 0, data).unwrap();
            assert_eq!(keys(&out), vec![Some(&b"1"[..])], "{data:?}");
            assert!(out.ended);
        }
        // Not alone on its line, or followed by more: PostgreSQL would stop
        // there or fail, never load it.
        for data in [&b"1\\.\n2\n"[..], b"\\.x\n", b"a\tb\\.\n"] {
            let e = feed(&text(), 0, data).unwrap_err();
            assert_eq!(e.sqlstate(), "22P04");
            assert!(e.message().contains("end-of-copy marker"), "{e}");
        }
        // An escaped backslash then a dot is data.
        let out = feed(&text(), 0, b"\\\\.\n").unwrap();
        assert_eq!(keys(&out), vec![Some(&b"\\."[..])]);
    }

    #[test]
    fn text_line_endings() {
        let out = feed_all_splits(&text(), 0, b"1\ta\r\n2\tb\r\n3").unwrap();
        assert_eq!(rows(&out), vec![&b"1\ta\r\n"[..], b"2\tb\r\n", b"3"]);
        assert_eq!(keys(&out), vec![Some(&b"1"[..]), Some(b"2"), Some(b"3")]);
        let out = feed_all_splits(&text(), 1, b"1\ta\r2\tb\r").unwrap();
        assert_eq!(rows(&out), vec![&b"1\ta\r"[..], b"2\tb\r"]);
        assert_eq!(keys(&out), vec![Some(&b"a"[..]), Some(b"b")]);
        // A last line without newline is a row.
        let out = feed_all_splits(&text(), 0, b"1\n2").unwrap();
        assert_eq!(rows(&out), vec![&b"1\n"[..], b"2"]);
        // A lone CR at the very end ends a line.
        let out = feed(&text(), 0, b"1\r").unwrap();
        assert_eq!(rows(&out), vec![&b"1\r"[..]]);
        // Escaped CR and LF are data.
        let out = feed(&text(), 0, b"a\\\rb\n").unwrap();
        assert_eq!(keys(&out), vec![Some(&b"a\rb"[..])]);
        // Mixed styles are refused as PostgreSQL refuses them.
        for (data, msg) in [
            (&b"1\n2\r\n"[..], "carriage return"),
            (b"1\r\n2\n", "newline"),
            (b"1\r2\n", "newline"),
            (b"1\r\n2\r3\r\n", "carriage return"),
            (b"1\r\n2\r", "carriage return"),
        ] {
            let e = feed(&text(), 0, data).unwrap_err();
            assert!(e.message().contains(msg), "{data:?}: {e}");
            assert_eq!(e.sqlstate(), "22P04");
        }
    }

    #[test]
    fn text_missing_key_field() {
        let e = feed(&text(), 2, b"1\t2\t3\n1\t2\n").unwrap_err();
        assert_eq!(e.sqlstate(), "22P04");
        assert_eq!(
            e.message(),
            "missing data for column: row 2 has no field 3 (the sharding key), only 2"
        );
        // The header counts as a row, as in PostgreSQL's line numbers.
        let o = stmt("COPY t FROM STDIN (HEADER)").options;
        let e = feed(&o, 1, b"a\tb\n1\n").unwrap_err();
        assert!(e.message().contains("row 2 has no field 2"), "{e}");
        // An escaped delimiter does not make a field.
        let e = feed(&text(), 1, b"1\\\t2\n").unwrap_err();
        assert!(e.message().contains("row 1 has no field 2"), "{e}");
    }

    #[test]
    fn text_trailing_backslash_is_dropped_from_the_key() {
        let out = feed(&text(), 0, b"ab\\").unwrap();
        assert_eq!(rows(&out), vec![&b"ab\\"[..]]);
        assert_eq!(keys(&out), vec![Some(&b"ab"[..])]);
    }

    #[test]
    fn binary_in_text_keys_is_passed_through() {
        let out = feed(&text(), 0, "é\t\u{1F600}\n".as_bytes()).unwrap();
        assert_eq!(keys(&out), vec![Some("é".as_bytes())]);
    }

    // ---- CSV ----

    #[test]
    fn csv_rows_quotes_and_nulls() {
        let data = b"1,\"a,b\"\n\"2\",\"say \"\"hi\"\"\"\n,x\n\"\",y\n";
        let out = feed_all_splits(&csv(), 0, data).unwrap();
        assert_eq!(
            rows(&out),
            vec![
                &b"1,\"a,b\"\n"[..],
                b"\"2\",\"say \"\"hi\"\"\"\n",
                b",x\n",
                b"\"\",y\n"
            ]
        );
        assert_eq!(
            keys(&out),
            vec![Some(&b"1"[..]), Some(b"2"), None, Some(b"")]
        );
        let out = feed_all_splits(&csv(), 1, data).unwrap();
        assert_eq!(
            keys(&out),
            vec![
                Some(&b"a,b"[..]),
                Some(b"say \"hi\""),
                Some(b"x"),
                Some(b"y")
            ]
        );
    }

    #[test]
    fn csv_multiline_quoted_fields() {
        let data = b"\"line1\nline2\r\nline3\",k1\n\"\n\",k2\nlast,\"k\n3\"";
        let out = feed_all_splits(&csv(), 1, data).unwrap();
        assert_eq!(
            rows(&out),
            vec![
                &b"\"line1\nline2\r\nline3\",k1\n"[..],
                b"\"\n\",k2\n",
                b"last,\"k\n3\""
            ]
        );
        assert_eq!(
            keys(&out),
            vec![Some(&b"k1"[..]), Some(b"k2"), Some(b"k\n3")]
        );
        let out = feed(&csv(), 0, data).unwrap();
        assert_eq!(
            keys(&out),
            vec![
                Some(&b"line1\nline2\r\nline3"[..]),
                Some(b"\n"),
                Some(b"last")
            ]
        );
    }

    #[test]
    fn csv_quoted_delimiters_and_partial_quotes() {
        // Quotes can open mid-field, as PostgreSQL allows.
        let data = b"ab\"c,d\"e,k\n";
        let out = feed_all_splits(&csv(), 0, data).unwrap();
        assert_eq!(keys(&out), vec![Some(&b"abc,de"[..])]);
        let out = feed(&csv(), 1, data).unwrap();
        assert_eq!(keys(&out), vec![Some(&b"k"[..])]);
    }

    #[test]
    fn csv_custom_delimiter_quote_escape() {
        let o = stmt(
            "COPY t FROM STDIN (FORMAT csv, DELIMITER ';', QUOTE '''', ESCAPE '\\', NULL 'NULL')",
        )
        .options;
        let data = b"'a;b';'it\\'s'\n'x\\\\';NULL\n'\\\\';'NULL'\nq\"r;'\\x'\n";
        let out = feed_all_splits(&o, 1, data).unwrap();
        assert_eq!(
            keys(&out),
            vec![Some(&b"it's"[..]), None, Some(b"NULL"), Some(b"\\x")]
        );
        let out = feed(&o, 0, data).unwrap();
        assert_eq!(
            keys(&out),
            vec![Some(&b"a;b"[..]), Some(b"x\\"), Some(b"\\"), Some(b"q\"r")]
        );
        // An escaped quote does not close the field, even across lines.
        let data = b"'a\\'\nb',k\n";
        let o2 = stmt("COPY t FROM STDIN (FORMAT csv, QUOTE '''', ESCAPE '\\')").options;
        let out = feed_all_splits(&o2, 1, data).unwrap();
        assert_eq!(rows(&out), vec![&data[..]]);
        assert_eq!(keys(&out), vec![Some(&b"k"[..])]);
        let out = feed(&o2, 0, data).unwrap();
        assert_eq!(keys(&out), vec![Some(&b"a'\nb"[..])]);
        // Outside quotes the escape is an ordinary character.
        let out = feed(&o2, 0, b"a\\,k\n").unwrap();
        assert_eq!(keys(&out), vec![Some(&b"a\\"[..])]);
    }

    #[test]
    fn csv_null_string() {
        let o = stmt("COPY t FROM STDIN (FORMAT csv, NULL '\\N')").options;
        let out = feed(&o, 0, b"\\N,1\n\"\\N\",2\n,3\n").unwrap();
        assert_eq!(keys(&out), vec![None, Some(&b"\\N"[..]), Some(b"")]);
    }

    #[test]
    fn csv_header() {
        let o = stmt("COPY t FROM STDIN WITH CSV HEADER").options;
        let data = b"\"id\nx\",name\n1,a\n2,b\n";
        let out = feed_all_splits(&o, 0, data).unwrap();
        assert_eq!(out.header.as_deref(), Some(&b"\"id\nx\",name\n"[..]));
        assert_eq!(keys(&out), vec![Some(&b"1"[..]), Some(b"2")]);
    }

    #[test]
    fn csv_header_with_crlf_and_end_marker_first() {
        let o = stmt("COPY t FROM STDIN (FORMAT csv, HEADER true)").options;
        let out = feed_all_splits(&o, 1, b"a,\"b\r\nc\"\r\n1,x\r\n2,y").unwrap();
        assert_eq!(out.header.as_deref(), Some(&b"a,\"b\r\nc\"\r\n"[..]));
        assert_eq!(rows(&out), vec![&b"1,x\r\n"[..], b"2,y"]);
        assert_eq!(keys(&out), vec![Some(&b"x"[..]), Some(b"y")]);
        // The end marker before any header: no header, no rows.
        let out = feed_all_splits(&o, 0, b"\\.\nid\n1\n").unwrap();
        assert!(out.ended && out.header.is_none() && out.rows.is_empty());
    }

    #[test]
    fn csv_end_marker() {
        let data = b"1,a\n\\.\n2,b\n";
        let out = feed_all_splits(&csv(), 0, data).unwrap();
        assert_eq!(keys(&out), vec![Some(&b"1"[..])]);
        assert!(out.ended);
        // Quoted, or not alone on its line, it is data.
        let out = feed_all_splits(&csv(), 0, b"\"\\.\"\n\\.,x\nx\\.\n\\.x\n").unwrap();
        assert_eq!(
            keys(&out),
            vec![
                Some(&b"\\."[..]),
                Some(b"\\."),
                Some(b"x\\."),
                Some(b"\\.x")
            ]
        );
        // Inside a multi-line quoted field it is data.
        let out = feed_all_splits(&csv(), 0, b"\"a\n\\.\nb\"\n2\n").unwrap();
        assert_eq!(keys(&out), vec![Some(&b"a\n\\.\nb"[..]), Some(b"2")]);
        let out = feed_all_splits(&csv(), 0, b"1\r\n\\.\r\n2\r\n").unwrap();
        assert_eq!(keys(&out), vec![Some(&b"1"[..])]);
        let out = feed(&csv(), 0, b"1\n\\.").unwrap();
        assert_eq!(keys(&out), vec![Some(&b"1"[..])]);
        assert!(out.ended);
    }

    #[test]
    fn csv_crlf_and_errors() {
        let out = feed_all_splits(&csv(), 1, b"1,a\r\n2,\"b\r\n\"\r\n").unwrap();
        assert_eq!(keys(&out), vec![Some(&b"a"[..]), Some(b"b\r\n")]);
        let e = feed(&csv(), 0, b"1\n2\r\n").unwrap_err();
        assert!(e.message().contains("unquoted carriage return"), "{e}");
        let e = feed(&csv(), 0, b"1\r\n2\n").unwrap_err();
        assert!(e.message().contains("unquoted newline"), "{e}");
        let e = feed(&csv(), 0, b"1\n\"abc\n").unwrap_err();
        assert_eq!(e.sqlstate(), "22P04");
        assert!(e.message().contains("unterminated CSV quoted field"), "{e}");
        let e = feed(&csv(), 3, b"1,2,3\n").unwrap_err();
        assert!(e.message().contains("row 1 has no field 4"), "{e}");
        // A quoted delimiter does not make a field.
        let e = feed(&csv(), 1, b"\"1,2\"\n").unwrap_err();
        assert!(e.message().contains("has no field 2"), "{e}");
    }

    // ---- limits ----

    #[test]
    fn row_too_large() {
        let mut data = vec![b'x'; 100];
        data.push(b'\n');
        // Exactly at the limit is fine, one byte more is not.
        assert!(feed_chunks(&text(), 0, 101, &[&data]).is_ok());
        let e = feed_chunks(&text(), 0, 100, &[&data]).unwrap_err();
        assert_eq!(e.sqlstate(), "54000");
        // Detected without waiting for the row to end.
        let mut s = RowSplitter::new(&csv(), 0, 50);
        let mut v = Vec::new();
        let mut failed = false;
        for _ in 0..10 {
            if s.push(b"\"0123456789", &mut v).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
        assert!(s.buf.len() <= 60);
        // A pending CR line that is too long.
        assert!(feed_chunks(&text(), 0, 4, &[b"abcd\r"]).is_err());
        assert!(feed_chunks(&text(), 0, 5, &[b"abcd\r"]).is_ok());
    }

    #[test]
    fn long_rows_in_small_pieces_are_scanned_once() {
        // 200 kB row fed 1 byte at a time would take seconds if rescanned.
        let mut data = vec![b'"'];
        data.extend(std::iter::repeat_n(b'a', 200_000));
        data.extend_from_slice(b"\",k\n");
        let mut s = RowSplitter::new(&csv(), 1, MAX);
        let mut v = Vec::new();
        for b in data.chunks(1) {
            s.push(b, &mut v).unwrap();
        }
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(v[0].bytes.len(), data.len());
    }

    // ---- binary ----

    fn bin_header(flags: i32, ext: &[u8]) -> Vec<u8> {
        let mut v = BINARY_SIGNATURE.to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&(ext.len() as i32).to_be_bytes());
        v.extend_from_slice(ext);
        v
    }

    fn tuple(fields: &[Option<&[u8]>]) -> Vec<u8> {
        let mut v = (fields.len() as i16).to_be_bytes().to_vec();
        for f in fields {
            match f {
                Some(b) => {
                    v.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    v.extend_from_slice(b);
                }
                None => v.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        v
    }

    fn binary() -> CopyOptions {
        CopyOptions::new(CopyFormat::Binary)
    }

    #[test]
    fn binary_tuples_and_keys() {
        let t1 = tuple(&[Some(&[0, 0, 0, 7]), Some(b"abc")]);
        let t2 = tuple(&[None, Some(b"")]);
        let t3 = tuple(&[Some(&[0, 0, 0, 9]), None]);
        let hdr = bin_header(0, b"ext");
        let data = [
            hdr.clone(),
            t1.clone(),
            t2.clone(),
            t3.clone(),
            BINARY_TRAILER.to_vec(),
        ]
        .concat();
        let out = feed_all_splits(&binary(), 0, &data).unwrap();
        assert_eq!(out.binary_header.as_deref(), Some(&hdr[..]));
        assert_eq!(rows(&out), vec![&t1[..], &t2, &t3]);
        assert_eq!(
            keys(&out),
            vec![Some(&[0, 0, 0, 7][..]), None, Some(&[0, 0, 0, 9])]
        );
        assert!(out.ended);
        let out = feed_all_splits(&binary(), 1, &data).unwrap();
        assert_eq!(keys(&out), vec![Some(&b"abc"[..]), Some(b""), None]);
        // Without the trailer, ending at a tuple boundary is accepted.
        let out = feed_all_splits(&binary(), 1, &[hdr, t1].concat()).unwrap();
        assert_eq!(out.rows.len(), 1);
        assert!(!out.ended);
    }

    #[test]
    fn binary_errors() {
        let hdr = bin_header(0, b"");
        let t = tuple(&[Some(b"k")]);
        // Trailer then garbage, in the same message or a later one.
        let e = feed(
            &binary(),
            0,
            &[
                hdr.clone(),
                t.clone(),
                BINARY_TRAILER.to_vec(),
                b"x".to_vec(),
            ]
            .concat(),
        )
        .unwrap_err();
        assert_eq!(e.message(), "received copy data after EOF marker");
        assert_eq!(e.sqlstate(), "22P04");
        let e = feed_chunks(&binary(), 0, MAX, &[&hdr, &BINARY_TRAILER, b"x"]).unwrap_err();
        assert_eq!(e.message(), "received copy data after EOF marker");
        assert!(feed_chunks(&binary(), 0, MAX, &[&hdr, &BINARY_TRAILER, b""]).is_ok());
        // Signature, OIDs, critical flags, extension length.
        let e = feed(&binary(), 0, b"PGCOPY\nX").unwrap_err();
        assert!(e.message().contains("signature"), "{e}");
        let e = feed(&binary(), 0, b"1\t2\n").unwrap_err();
        assert!(e.message().contains("signature"), "{e}");
        let e = feed(&binary(), 0, &bin_header(1 << 16, b"")).unwrap_err();
        assert!(e.message().contains("OIDS"), "{e}");
        let e = feed(&binary(), 0, &bin_header(1 << 17, b"")).unwrap_err();
        assert!(e.message().contains("critical"), "{e}");
        let mut bad = bin_header(0, b"");
        bad[15..19].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(feed(&binary(), 0, &bad).is_err());
        // Low flag bits are harmless.
        assert!(feed(&binary(), 0, &bin_header(1, b"")).is_ok());
        // Truncated input.
        assert!(feed(&binary(), 0, b"").is_err());
        assert!(feed(&binary(), 0, &hdr[..15]).is_err());
        let e = feed(
            &binary(),
            0,
            &[hdr.clone(), t[..t.len() - 1].to_vec()].concat(),
        )
        .unwrap_err();
        assert_eq!(e.message(), "unexpected EOF in COPY data");
        // Bad counts and sizes, missing key.
        let e = feed(
            &binary(),
            0,
            &[hdr.clone(), (-2i16).to_be_bytes().to_vec()].concat(),
        )
        .unwrap_err();
        assert!(e.message().contains("field count"), "{e}");
        let mut bad_len = hdr.clone();
        bad_len.extend_from_slice(&1i16.to_be_bytes());
        bad_len.extend_from_slice(&(-7i32).to_be_bytes());
        assert!(feed(&binary(), 0, &bad_len)
            .unwrap_err()
            .message()
            .contains("field size"));
        let e = feed(&binary(), 1, &[hdr.clone(), t.clone()].concat()).unwrap_err();
        assert!(e.message().contains("row 1 has no field 2"), "{e}");
        let e = feed(&binary(), 0, &[hdr.clone(), tuple(&[])].concat()).unwrap_err();
        assert!(e.message().contains("has no field 1"), "{e}");
        // A field too large is refused as soon as its length is read.
        let mut huge = hdr.clone();
        huge.extend_from_slice(&1i16.to_be_bytes());
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        let mut s = RowSplitter::new(&binary(), 0, 1000);
        let e = s.push(&huge, &mut Vec::new()).unwrap_err();
        assert_eq!(e.sqlstate(), "54000");
        let e = feed_chunks(&binary(), 0, 10, &[&bin_header(0, &[0; 100])]).unwrap_err();
        assert_eq!(e.sqlstate(), "54000");
    }

    // ---- OutMerger ----

    /// Feeds each shard's stream to a merger split into pieces by `cut`,
    /// interleaving shards piece by piece, and returns the merged output.
    fn merge(o: &CopyOptions, streams: &[Vec<u8>], cut: &dyn Fn(&[u8]) -> Vec<Vec<u8>>) -> Vec<u8> {
        let mut m = OutMerger::new(o, streams.len(), MAX);
        let mut out = Vec::new();
        let pieces: Vec<Vec<Vec<u8>>> = streams.iter().map(|s| cut(s)).collect();
        let longest = pieces.iter().map(Vec::len).max().unwrap_or(0);
        for i in 0..longest {
            for (shard, p) in pieces.iter().enumerate() {
                if let Some(piece) = p.get(i) {
                    m.push(shard, piece, &mut out).unwrap();
                }
            }
        }
        m.finish(&mut out).unwrap();
        out
    }

    /// Sequential merge: all of shard 0, then shard 1, …
    fn merge_in_order(
        o: &CopyOptions,
        streams: &[Vec<u8>],
        cut: &dyn Fn(&[u8]) -> Vec<Vec<u8>>,
    ) -> Vec<u8> {
        let mut m = OutMerger::new(o, streams.len(), MAX);
        let mut out = Vec::new();
        for (shard, s) in streams.iter().enumerate() {
            for piece in cut(s) {
                m.push(shard, &piece, &mut out).unwrap();
            }
            m.finish_shard(shard, &mut out).unwrap();
        }
        m.finish(&mut out).unwrap();
        out
    }

    /// Cuts a stream into CopyData payloads.
    type Cut = Box<dyn Fn(&[u8]) -> Vec<Vec<u8>>>;

    fn cuts() -> Vec<Cut> {
        let mut v: Vec<Cut> = vec![
            Box::new(|s: &[u8]| vec![s.to_vec()]),
            Box::new(|s: &[u8]| s.chunks(1).map(<[u8]>::to_vec).collect()),
            Box::new(|s: &[u8]| s.chunks(3).map(<[u8]>::to_vec).collect()),
        ];
        for at in 0..40 {
            v.push(Box::new(move |s: &[u8]| {
                let at = at.min(s.len());
                vec![s[..at].to_vec(), s[at..].to_vec()]
            }));
        }
        v
    }

    #[test]
    fn merges_text() {
        let o = text();
        let streams = vec![b"1\ta\n2\tb\n".to_vec(), b"".to_vec(), b"3\tc\n".to_vec()];
        for cut in cuts() {
            assert_eq!(merge_in_order(&o, &streams, &cut), b"1\ta\n2\tb\n3\tc\n");
            let m = merge(&o, &streams, &cut);
            let mut lines: Vec<&[u8]> = m.split_inclusive(|&b| b == b'\n').collect();
            lines.sort();
            assert_eq!(lines, vec![&b"1\ta\n"[..], b"2\tb\n", b"3\tc\n"]);
        }
    }

    #[test]
    fn merges_csv_and_text_headers() {
        for (o, streams, want) in [
            (
                stmt("COPY t TO STDOUT WITH CSV HEADER").options,
                vec![
                    b"id,\"na\nme\"\n1,\"x\ny\"\n".to_vec(),
                    b"id,\"na\nme\"\n2,z\n".to_vec(),
                    b"id,\"na\nme\"\n".to_vec(),
                ],
                b"id,\"na\nme\"\n1,\"x\ny\"\n2,z\n".to_vec(),
            ),
            (
                stmt("COPY t TO STDOUT (HEADER)").options,
                vec![b"id\tv\n1\ta\n".to_vec(), b"id\tv\n2\tb\n".to_vec()],
                b"id\tv\n1\ta\n2\tb\n".to_vec(),
            ),
        ] {
            for cut in cuts() {
                assert_eq!(merge_in_order(&o, &streams, &cut), want);
                // Interleaved: the header first, then every row once.
                let m = merge(&o, &streams, &cut);
                let mut first = RowSplitter::with_key(&o, None, MAX);
                first.push(&streams[0], &mut Vec::new()).unwrap();
                let header = first.header().cloned().unwrap();
                assert!(m.starts_with(&header));
                let split_rows = |data: &[u8]| {
                    let mut s = RowSplitter::with_key(&o, None, MAX);
                    let mut v = Vec::new();
                    s.push(data, &mut v).unwrap();
                    let mut v: Vec<Bytes> = v.into_iter().map(|r| r.bytes).collect();
                    v.sort();
                    v
                };
                assert_eq!(split_rows(&m), split_rows(&want));
                assert_eq!(m.len(), want.len());
            }
        }
        // No shard sent anything.
        let o = stmt("COPY t TO STDOUT WITH CSV HEADER").options;
        assert!(merge(&o, &[vec![], vec![]], &|s: &[u8]| vec![s.to_vec()]).is_empty());
    }

    #[test]
    fn merges_binary() {
        let hdr = bin_header(0, b"");
        let t = |k: u8| tuple(&[Some(&[k]), None]);
        let streams = vec![
            [hdr.clone(), t(1), t(2), BINARY_TRAILER.to_vec()].concat(),
            [hdr.clone(), BINARY_TRAILER.to_vec()].concat(),
            [hdr.clone(), t(3), BINARY_TRAILER.to_vec()].concat(),
        ];
        let want = [hdr.clone(), t(1), t(2), t(3), BINARY_TRAILER.to_vec()].concat();
        for cut in cuts() {
            assert_eq!(merge_in_order(&binary(), &streams, &cut), want);
            let m = merge(&binary(), &streams, &cut);
            assert_eq!(m.len(), want.len());
            assert_eq!(m[..hdr.len()], hdr[..]);
            assert_eq!(m[m.len() - 2..], BINARY_TRAILER);
            let mut s = RowSplitter::new(&binary(), 0, MAX);
            let mut rows = Vec::new();
            s.push(&m, &mut rows).unwrap();
            let mut keys: Vec<_> = rows.into_iter().filter_map(|r| r.key).collect();
            keys.sort();
            assert_eq!(keys, vec![vec![1], vec![2], vec![3]]);
        }
        // Only zero-row shards: header and trailer once.
        let empty = [hdr.clone(), BINARY_TRAILER.to_vec()].concat();
        let m = merge(&binary(), &[empty.clone(), empty.clone()], &|s: &[u8]| {
            vec![s.to_vec()]
        });
        assert_eq!(m, empty);
    }

    #[test]
    fn merger_errors() {
        let mut m = OutMerger::new(&binary(), 2, MAX);
        let mut out = Vec::new();
        assert!(m.push(5, b"x", &mut out).is_err());
        m.push(0, &bin_header(0, b""), &mut out).unwrap();
        m.push(0, &[0, 1, 0], &mut out).unwrap();
        assert!(m.finish_shard(0, &mut out).is_err());
        let mut m = OutMerger::new(&text(), 1, MAX);
        let mut out = Vec::new();
        m.push(0, b"1\n2", &mut out).unwrap();
        assert_eq!(out, b"1\n");
        m.finish(&mut out).unwrap();
        assert_eq!(out, b"1\n2\n");
    }
}
