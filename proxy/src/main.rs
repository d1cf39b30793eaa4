fn main() -> std::process::ExitCode {
    pylon_proxy::main_with_args(std::env::args_os().collect())
}
