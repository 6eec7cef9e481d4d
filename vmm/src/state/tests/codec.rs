//! The encoding of a machine state: exact round trips of a real state,
//! and clear errors (never a panic) for everything else.

use std::time::Duration;

use kvm_bindings::kvm_regs;

use super::harness::{End, Machine, kvm, probe_elf};
use super::*;

/// A real two-vCPU state of the probe guest mid-workload.
fn real_state() -> MachineState {
    let kvm = kvm();
    let msrs = msr_indices_to_save(&kvm).expect("msr list");
    let mut m = Machine::boot(&kvm, &probe_elf(), "dirty=4 report=1", 2, 32);
    let (end, _) = m.run(Duration::from_secs(30), &mut |s| {
        s.text.contains("PROBE dirty table=")
    });
    assert_eq!(end, End::Stopped);
    m.save(&msrs, b"opaque device blob".to_vec())
}

/// xorshift64*: reproducible garbage.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.max(1);
    move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn err(bytes: &[u8]) -> String {
    match decode(bytes) {
        Ok(_) => panic!("decoded {} bytes that are not a valid state", bytes.len()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn encoding_round_trips_and_refuses_bad_bytes() {
    let state = real_state();
    let bytes = encode(&state);
    assert_eq!(&bytes[..8], MAGIC);
    assert_eq!(decode(&bytes).expect("decode"), state);
    assert_eq!(
        encode(&decode(&bytes).expect("decode")),
        bytes,
        "not byte-stable"
    );

    // Every truncation.
    for len in 0..bytes.len() {
        let e = err(&bytes[..len]);
        assert!(
            e.contains("shorter than its 12-byte header") || e.contains("corrupt"),
            "{len}: {e}"
        );
    }
    // A byte too many.
    let mut long = bytes.clone();
    long.push(0);
    assert!(err(&long).contains("1 bytes follow the end of the state"));

    // Magic and version.
    let mut foreign = bytes.clone();
    foreign[0] = b'X';
    assert_eq!(
        err(&foreign),
        "not an evm machine state (no EVMSTATE magic)"
    );
    let mut newer = bytes.clone();
    newer[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(
        err(&newer),
        "machine state version 2; this evm reads version 1"
    );
    let mut other = state.clone();
    other.version = 0xdead;
    assert_eq!(
        err(&encode(&other)),
        "machine state version 57005; this evm reads version 1"
    );

    // Garbage after a valid header, and a length prefix of 2^64 - 1
    // (must fail on the limit, not try to allocate it).
    let mut next = rng(42);
    for round in 0..2000 {
        let len = (next() % 40_000) as usize;
        let mut g = bytes[..HEADER_LEN].to_vec();
        g.extend((0..len).map(|_| next() as u8));
        assert!(decode(&g).is_err(), "garbage round {round} decoded");
    }
    let mut huge = bytes[..HEADER_LEN].to_vec();
    huge.push(1); // version
    huge.push(253); // bincode varint: a u64 follows
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(err(&huge).contains("corrupt"));

    // Flipped bytes anywhere: an error or some other state, never a panic.
    let mut next = rng(7);
    for _ in 0..5000 {
        let mut f = bytes.clone();
        let at = HEADER_LEN + (next() as usize) % (f.len() - HEADER_LEN);
        f[at] ^= 1 << (next() % 8);
        let _ = decode(&f);
    }
}

#[test]
fn kvm_structures_must_have_their_exact_size() {
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct Regs(#[serde(with = "crate::state::codec::kvm")] kvm_regs);
    #[derive(serde::Serialize)]
    struct Raw(#[serde(with = "crate::state::codec::bytes")] Vec<u8>);

    let cfg = bincode::config::standard();
    let regs = kvm_regs {
        rip: 0x1234,
        r15: 7,
        ..Default::default()
    };
    let good = bincode::serde::encode_to_vec(Regs(regs), cfg).expect("encode");
    let (back, _): (Regs, usize) = bincode::serde::decode_from_slice(&good, cfg).expect("decode");
    assert_eq!(back.0, regs);
    for len in [0, 100, 143, 145, 4096] {
        let raw = bincode::serde::encode_to_vec(Raw(vec![0xaa; len]), cfg).expect("encode");
        let e = bincode::serde::decode_from_slice::<Regs, _>(&raw, cfg)
            .expect_err("a wrong-sized kvm_regs must be refused")
            .to_string();
        assert!(
            e.contains(&format!("kvm_regs is 144 bytes, but the state holds {len}")),
            "{e}"
        );
    }
}
