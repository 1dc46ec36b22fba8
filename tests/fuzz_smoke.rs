//! A bounded run of every fuzz target on the stable toolchain, for CI: each input that ever
//! crashed a target (`fuzz/regressions/<target>/`), then a few thousand generated inputs,
//! most of them well-formed (valid message streams, startup packets, SCRAM exchanges,
//! console commands, SQL, ini and TOML) so that the targets' properties, such as "a stream
//! scans alike in any pieces", are exercised on real traffic and not only on garbage.
//!
//! The generator is seeded: a run is reproducible, and `WEIR_FUZZ_SEED=<n>` explores
//! another part of the space. A failing input is written to `target/fuzz-smoke/` and its
//! bytes printed, ready to be copied into `fuzz/regressions/<target>/`.
//! `cargo test --test fuzz_smoke -- --ignored` writes a seed corpus to `fuzz/corpus/`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use weir::fuzzing;

#[path = "fuzz_gen/mod.rs"]
mod gen;

fn target(name: &str) -> fuzzing::Target {
    fuzzing::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

fn seed(name: &str) -> u64 {
    let base = std::env::var("WEIR_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    name.bytes()
        .fold(base, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs `f` on `input`; on a panic, saves the input and fails naming it.
fn run_one(name: &str, what: &str, input: &[u8]) {
    let f = target(name);
    if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-smoke");
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join(format!("{name}-crash.bin"));
        let _ = std::fs::write(&file, input);
        panic!(
            "fuzz target {name} panicked on {what} (saved to {}):\n{}",
            file.display(),
            hex(input)
        );
    }
}

fn regressions_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(name)
}

#[test]
fn every_saved_crash_input_passes() {
    let mut ran = 0;
    for (name, _) in fuzzing::TARGETS {
        let Ok(entries) = std::fs::read_dir(regressions_dir(name)) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for file in files.iter().filter(|f| f.is_file()) {
            let input = std::fs::read(file).expect("regression input is readable");
            run_one(name, &file.display().to_string(), &input);
            ran += 1;
        }
    }
    assert!(
        ran > 0,
        "fuzz/regressions/ holds the inputs that once crashed"
    );
}

/// Makes one input for a target.
type Generator = fn(&mut StdRng) -> Vec<u8>;

/// Runs `count` inputs from `generate` through the target.
fn generated(name: &str, count: usize, generate: Generator) {
    let mut rng = StdRng::seed_from_u64(seed(name));
    for i in 0..count {
        let input = generate(&mut rng);
        run_one(name, &format!("generated input {i}"), &input);
    }
}

#[test]
fn frame_scanner_split_and_whole_agree() {
    generated("frame_scanner", 4000, gen::messages::relay_input);
}

#[test]
fn startup_packet_survives_and_round_trips() {
    generated("startup_packet", 4000, gen::messages::startup_input);
}

#[test]
fn scram_messages_fail_cleanly_and_real_clients_authenticate() {
    generated("scram_messages", 600, gen::messages::scram_input);
}

#[test]
fn admin_command_round_trips() {
    generated("admin_command", 4000, gen::text::admin_input);
}

#[test]
fn sql_routing_by_shape_matches_routing_whole() {
    generated("sql_routing", 1500, gen::text::sql_input);
}

#[test]
fn pgbouncer_ini_loads_or_refuses() {
    generated("pgbouncer_ini", 1500, gen::config::ini_input);
}

#[test]
fn weir_toml_loads_or_refuses() {
    generated("weir_toml", 1500, gen::config::toml_input);
}

/// Mutates generated input the way a fuzzer would: flip, insert, delete or truncate.
pub fn mutate(rng: &mut StdRng, mut data: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.gen_range(1..4) {
        let at = rng.gen_range(0..=data.len());
        match rng.gen_range(0..4) {
            0 if at < data.len() => data[at] ^= 1 << rng.gen_range(0..8),
            1 => data.insert(at, rng.gen()),
            2 if at < data.len() => {
                data.remove(at);
            }
            _ => data.truncate(at),
        }
    }
    data
}

/// Writes generated inputs as a starting corpus for `cargo fuzz run`.
#[test]
#[ignore = "writes fuzz/corpus/ for cargo fuzz; run by hand"]
fn write_seed_corpus() {
    let gens: &[(&str, Generator)] = &[
        ("frame_scanner", gen::messages::relay_input),
        ("startup_packet", gen::messages::startup_input),
        ("scram_messages", gen::messages::scram_input),
        ("admin_command", gen::text::admin_input),
        ("sql_routing", gen::text::sql_input),
        ("pgbouncer_ini", gen::config::ini_input),
        ("weir_toml", gen::config::toml_input),
    ];
    for (name, generate) in gens {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(name);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        let mut rng = StdRng::seed_from_u64(seed(name));
        for i in 0..200 {
            std::fs::write(dir.join(format!("seed-{i:03}")), generate(&mut rng))
                .expect("corpus file");
        }
    }
}
