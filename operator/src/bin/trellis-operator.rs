//! `trellis-operator`: wiring only; see `trellis_operator::runtime`.
fn main() -> std::process::ExitCode {
    eprintln!("trellis-operator: not built yet");
    std::process::ExitCode::from(1)
}
