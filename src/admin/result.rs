//! A result set as the console sends it: typed columns and text rows, encoded
//! as RowDescription + DataRow… + CommandComplete, like PgBouncer's answers.

use crate::wire::build;
use bytes::{BufMut, BytesMut};

/// Column types PgBouncer's console uses: counts are `int4`, statistics are
/// `numeric` (since PgBouncer 1.12, so no value overflows `bigint`), and
/// everything else, timestamps included, is `text`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Text,
    Int4,
    Int8,
    Numeric,
}

impl Type {
    pub fn oid(self) -> u32 {
        match self {
            Type::Int8 => 20,
            Type::Int4 => 23,
            Type::Text => 25,
            Type::Numeric => 1700,
        }
    }

    fn size(self) -> i16 {
        match self {
            Type::Int4 => 4,
            Type::Int8 => 8,
            Type::Text | Type::Numeric => -1,
        }
    }
}

/// Short names for column lists.
pub const TEXT: Type = Type::Text;
pub const INT4: Type = Type::Int4;
pub const INT8: Type = Type::Int8;
pub const NUMERIC: Type = Type::Numeric;

/// One value of a row: text, or NULL.
pub type Cell = Option<String>;

pub fn text(s: impl Into<String>) -> Cell {
    Some(s.into())
}

pub fn num(n: impl std::fmt::Display) -> Cell {
    Some(n.to_string())
}

pub const NULL: Cell = None;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultSet {
    pub columns: Vec<(&'static str, Type)>,
    pub rows: Vec<Vec<Cell>>,
}

impl ResultSet {
    pub fn new(columns: &[(&'static str, Type)]) -> ResultSet {
        ResultSet {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<Cell>) {
        debug_assert_eq!(row.len(), self.columns.len(), "row width");
        self.rows.push(row);
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.columns.iter().map(|(n, _)| *n).collect()
    }

    /// The rows as (first column → second column), for key/value sets.
    pub fn column(&self, name: &str) -> Vec<Option<&str>> {
        let Some(i) = self.columns.iter().position(|(n, _)| *n == name) else {
            return Vec::new();
        };
        self.rows.iter().map(|r| r[i].as_deref()).collect()
    }

    /// RowDescription, DataRows and CommandComplete `SHOW`.
    pub fn encode(&self, out: &mut BytesMut) {
        let desc: Vec<(&str, u32, i16)> = self
            .columns
            .iter()
            .map(|(n, t)| (*n, t.oid(), t.size()))
            .collect();
        out.put(build::row_description(&desc));
        for row in &self.rows {
            out.put(build::data_row(row));
        }
        out.put(build::command_complete("SHOW"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_description_rows_and_show_tag() {
        let mut rs = ResultSet::new(&[("name", TEXT), ("n", INT4), ("v", NUMERIC)]);
        rs.push(vec![text("a"), num(1), NULL]);
        let mut out = BytesMut::new();
        rs.encode(&mut out);
        assert_eq!(out[0], b'T');
        // Type oids in column order: text, int4, numeric.
        let oids: Vec<u32> = [25u32, 23, 1700].to_vec();
        let mut found = Vec::new();
        let mut pos = 7;
        for _ in 0..3 {
            let end = pos + out[pos..].iter().position(|&b| b == 0).unwrap_or(0);
            pos = end + 1 + 6;
            found.push(u32::from_be_bytes([
                out[pos],
                out[pos + 1],
                out[pos + 2],
                out[pos + 3],
            ]));
            pos += 4 + 2 + 4 + 2;
        }
        assert_eq!(found, oids);
        assert!(out.ends_with(b"C\0\0\0\x09SHOW\0"));
        assert_eq!(rs.column("name"), vec![Some("a")]);
    }
}
