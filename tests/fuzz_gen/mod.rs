//! Generators of well-formed (and then lightly mutated) input for each fuzz target.

pub mod config;
pub mod messages;
pub mod text;

use rand::rngs::StdRng;
use rand::Rng;

/// One of `items`, chosen uniformly.
pub fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.gen_range(0..items.len())]
}
