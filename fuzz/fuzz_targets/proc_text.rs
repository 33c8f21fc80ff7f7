#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| leakmon::fuzzing::proc_text(data));
