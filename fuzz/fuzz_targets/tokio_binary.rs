#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| leakmon::fuzzing::tokio_binary(data));
