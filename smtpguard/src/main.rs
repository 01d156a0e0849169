//! The `smtpguard` binary: the daemon (`smtpguard run`) and the operator's
//! CLI in one; see [`smtpguard::cli`].

fn main() -> std::process::ExitCode {
    smtpguard::cli::main()
}
