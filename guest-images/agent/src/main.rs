//! The in-guest agent (placeholder until its own commit lands).
fn main() {}
