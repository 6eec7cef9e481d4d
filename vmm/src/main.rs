//! `evm`: the command line.
fn main() {}
