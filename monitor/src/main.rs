use std::process::ExitCode;

fn main() -> ExitCode {
    match leakmon::cli::main() {
        Ok(code) => code,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line: "attaching ...: permission denied".
            #[expect(clippy::print_stderr, reason = "the binary's last word goes to stderr")]
            {
                eprintln!("leakmon: error: {e:#}");
            }
            ExitCode::from(2)
        }
    }
}
