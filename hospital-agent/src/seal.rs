//! Sealed hand-off of the client-side weights from one hospital's agent to the next.
//!
//! `crypto_box` (X25519 + XSalsa20-Poly1305, NaCl's `box`): the sender's secret key and the
//! recipient's public key. Only the recipient can open it, and opening proves it came from the
//! holder of the sender's key; the coordinator stores and relays the bytes and can read nothing.
//! The plaintext binds the job and the visit it came from, so a sealed blob cannot be replayed
//! into another job or passed off as a later visit's.

use crypto_box::aead::{Aead, AeadCore, OsRng};
use crypto_box::{PublicKey, SalsaBox, SecretKey};

const MAGIC: &[u8; 4] = b"MSW1";
const NONCE: usize = 24;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SealError {
    #[error("sealed weights are too short")]
    Short,
    #[error("sealed weights do not open with this agent's key and the sender's key")]
    Open,
    #[error("sealed weights are malformed")]
    Malformed,
    #[error(
        "sealed weights are for job {job}, visit {visit}; expected job {expected_job}, visit {expected_visit}"
    )]
    Context {
        job: i64,
        visit: i64,
        expected_job: i64,
        expected_visit: i64,
    },
    #[error("a public key must be 32 bytes")]
    Key,
}

pub fn public_key(bytes: &[u8]) -> Result<PublicKey, SealError> {
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| SealError::Key)?;
    Ok(PublicKey::from(bytes))
}

/// Seals `parameters` (client weights of `job`, at the end of `visit`) from `sender` to
/// `recipient`: `nonce ‖ ciphertext`.
pub fn seal(
    sender: &SecretKey,
    recipient: &PublicKey,
    job: i64,
    visit: i64,
    parameters: &[f32],
) -> Vec<u8> {
    let mut plain = Vec::with_capacity(20 + parameters.len() * 4);
    plain.extend_from_slice(MAGIC);
    plain.extend_from_slice(&job.to_le_bytes());
    plain.extend_from_slice(&visit.to_le_bytes());
    plain.extend(parameters.iter().flat_map(|v| v.to_le_bytes()));
    let b = SalsaBox::new(recipient, sender);
    let nonce = SalsaBox::generate_nonce(&mut OsRng);
    let ct = b
        .encrypt(&nonce, plain.as_slice())
        .expect("encryption into a Vec cannot fail");
    let mut out = nonce.to_vec();
    out.extend(ct);
    out
}

/// Opens weights sealed by `sender` to `recipient`, checking they belong to `job` and `visit`.
pub fn open(
    recipient: &SecretKey,
    sender: &PublicKey,
    sealed: &[u8],
    job: i64,
    visit: i64,
) -> Result<Vec<f32>, SealError> {
    if sealed.len() < NONCE {
        return Err(SealError::Short);
    }
    let (nonce, ct) = sealed.split_at(NONCE);
    let b = SalsaBox::new(sender, recipient);
    let plain = b.decrypt(nonce.into(), ct).map_err(|_| SealError::Open)?;
    if plain.len() < 20 || &plain[..4] != MAGIC || !(plain.len() - 20).is_multiple_of(4) {
        return Err(SealError::Malformed);
    }
    let got_job = i64::from_le_bytes(plain[4..12].try_into().expect("8 bytes"));
    let got_visit = i64::from_le_bytes(plain[12..20].try_into().expect("8 bytes"));
    if (got_job, got_visit) != (job, visit) {
        return Err(SealError::Context {
            job: got_job,
            visit: got_visit,
            expected_job: job,
            expected_visit: visit,
        });
    }
    Ok(plain[20..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_recipient_opens_and_context_is_bound() {
        let a = SecretKey::generate(&mut OsRng);
        let b = SecretKey::generate(&mut OsRng);
        let eve = SecretKey::generate(&mut OsRng);
        let w = vec![0.5f32, -1.25, 3.0];
        let sealed = seal(&a, &b.public_key(), 7, 11, &w);
        assert_eq!(open(&b, &a.public_key(), &sealed, 7, 11).unwrap(), w);
        // The coordinator (or anyone else) cannot open it.
        assert_eq!(
            open(&eve, &a.public_key(), &sealed, 7, 11),
            Err(SealError::Open)
        );
        // A blob sealed by someone else than the claimed sender is refused.
        let forged = seal(&eve, &b.public_key(), 7, 11, &w);
        assert_eq!(
            open(&b, &a.public_key(), &forged, 7, 11),
            Err(SealError::Open)
        );
        // Replays into another job or visit are refused.
        assert!(matches!(
            open(&b, &a.public_key(), &sealed, 8, 11),
            Err(SealError::Context { .. })
        ));
        // Tampering and truncation are refused without panics.
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 1;
            assert!(open(&b, &a.public_key(), &t, 7, 11).is_err());
            assert!(open(&b, &a.public_key(), &sealed[..i], 7, 11).is_err());
        }
        // The plaintext does not appear in the sealed bytes.
        let needle: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert!(!sealed.windows(needle.len()).any(|x| x == needle));
    }
}
