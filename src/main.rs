#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    petrel::cli::main()
}
