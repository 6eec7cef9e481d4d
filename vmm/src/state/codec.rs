//! The byte form of a [`MachineState`], and the serde helpers that keep
//! decoding strict.
//!
//! # Layout
//!
//! | bytes | contents |
//! | --- | --- |
//! | 0..8 | magic `EVMSTATE` |
//! | 8..12 | format version, little-endian u32 ([`STATE_VERSION`]) |
//! | 12.. | the [`MachineState`] in bincode 2's standard encoding (little-endian, variable-length integers) |
//!
//! The version sits outside the bincode body so that a state written by
//! another evm is refused by its number before anything else is parsed.
//! Decoding never panics: garbage, a truncated body, trailing bytes, a
//! KVM structure of the wrong size or a length prefix beyond
//! [`DECODE_LIMIT`] are each an error. Integrity (CRC) is the store's job,
//! not this encoding's.

use serde::de::{DeserializeOwned, Error as _, Visitor};
use serde::{Deserializer, Serialize, Serializer};

use super::{MachineState, STATE_VERSION, StateError};

/// First bytes of every encoded machine state.
pub const MAGIC: &[u8; 8] = b"EVMSTATE";
/// Bytes before the bincode body: magic and version.
pub const HEADER_LEN: usize = 12;
/// Largest body [`decode`] accepts: bincode refuses any length prefix that
/// would make it read or allocate more.
pub const DECODE_LIMIT: usize = 1 << 30;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Encodes `state` (its own `version` goes in the header).
pub fn encode(state: &MachineState) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 16 * 1024 * state.vcpus.len().max(1));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&state.version.to_le_bytes());
    // Writing into a Vec cannot fail, and every field serializes (plain
    // data, byte strings, sequences of known length).
    if let Err(e) = bincode::serde::encode_into_std_write(state, &mut out, config()) {
        unreachable!("encoding a machine state into memory failed: {e}");
    }
    out
}

/// Decodes what [`encode`] wrote, refusing anything else.
pub fn decode(bytes: &[u8]) -> Result<MachineState, StateError> {
    if bytes.len() < HEADER_LEN {
        return Err(StateError::Truncated { len: bytes.len() });
    }
    if &bytes[..8] != MAGIC {
        return Err(StateError::Magic);
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&bytes[8..HEADER_LEN]);
    let version = u32::from_le_bytes(version);
    if version != STATE_VERSION {
        return Err(StateError::Version { found: version });
    }
    let body = &bytes[HEADER_LEN..];
    let (state, used): (MachineState, usize) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| StateError::Corrupt {
            reason: e.to_string(),
        })?;
    if used != body.len() {
        return Err(StateError::Corrupt {
            reason: format!("{} bytes follow the end of the state", body.len() - used),
        });
    }
    if state.version != version {
        return Err(StateError::Corrupt {
            reason: format!(
                "the header says version {version} but the body says {}",
                state.version
            ),
        });
    }
    Ok(state)
}

/// Collects a serde byte string (or a sequence of bytes) into a `Vec`.
struct ByteBuf;

impl<'de> Visitor<'de> for ByteBuf {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
        Ok(v)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(b) = seq.next_element()? {
            v.push(b);
        }
        Ok(v)
    }
}

/// `#[serde(with = "bytes")]` for a `Vec<u8>`: one length and the raw
/// bytes, instead of one integer per byte.
pub mod bytes {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_bytes(ByteBuf)
    }
}

/// `#[serde(with = "kvm")]` for a KVM structure from kvm-bindings: its
/// own serde form (the structure's raw bytes), but decoding insists on
/// exactly `size_of::<T>()` bytes. kvm-bindings alone would zero-pad or cut
/// a byte string of another length, which hides corruption.
pub mod kvm {
    use super::*;

    pub fn serialize<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        let raw = d.deserialize_bytes(ByteBuf)?;
        let want = std::mem::size_of::<T>();
        if raw.len() != want {
            return Err(D::Error::custom(format_args!(
                "{} is {want} bytes, but the state holds {}",
                std::any::type_name::<T>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("a KVM structure"),
                raw.len()
            )));
        }
        T::deserialize(serde::de::value::BytesDeserializer::<D::Error>::new(&raw))
    }
}
