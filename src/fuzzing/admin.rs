//! The admin console grammar: any text parses or is refused without panicking, and what
//! is accepted, written back in its fully quoted form, parses to the same statement.

use crate::admin::parse::{parse, Statement};

pub fn check(text: &str) {
    let Ok(statement) = parse(text) else {
        return;
    };
    let again = render(&statement);
    assert_eq!(
        parse(&again).as_ref(),
        Ok(&statement),
        "{text:?} parsed, but its rendering {again:?} does not parse back"
    );
}

/// The statement with every part quoted, which the grammar must read back unchanged.
fn render(statement: &Statement) -> String {
    match statement {
        Statement::Command { command, arg } => match arg {
            Some(arg) => format!("{} {}", quote(command, '"'), quote(arg, '"')),
            None => quote(command, '"'),
        },
        Statement::Set { key, value } => {
            format!("SET {} = {};", quote(key, '"'), quote(value, '\''))
        }
        Statement::Reshard { source, target } => {
            format!("RESHARD {} TO {}", quote(source, '"'), quote(target, '"'))
        }
    }
}

fn quote(s: &str, q: char) -> String {
    let doubled = s.replace(q, &format!("{q}{q}"));
    format!("{q}{doubled}{q}")
}
