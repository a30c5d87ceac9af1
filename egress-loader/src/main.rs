use std::process::ExitCode;

fn main() -> ExitCode {
    egress_router::cli::main()
}
