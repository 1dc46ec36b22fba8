#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::weir_toml(data));
