//! Feature vectors as the features stage makes them and the feature store keeps them.
//!
//! An image's vector is its pixels after resizing and cropping, one byte each (224×224×3 is
//! 147 KiB, small enough for a DynamoDB item); the model scales and normalises them itself, on
//! its device. Tabular features are f32 values the model takes as they are.
//!
//! Stored bytes are versioned. Version 1 starts with [`MAGIC`], then the version, then the kind
//! (values or pixels), then the payload. Stores written before it hold bare little-endian f32s
//! (version 0), still read as values. The magic's four bytes read as an f32 are a NaN, which no
//! vector of version 0 begins with (image values are finite and JSON has no NaN), so the two
//! cannot be mistaken for each other.

use crate::error::{ReasonCode, SluiceError};
use crate::model::ImageInput;

/// The start of every vector written since version 1.
pub const MAGIC: [u8; 4] = [b'S', b'V', 0xF5, 0xFF];
/// The encoding this build writes and the newest it reads.
pub const VERSION: u8 = 1;

const KIND_VALUES: u8 = 0;
const KIND_PIXELS: u8 = 1;
const HEADER: usize = MAGIC.len() + 2;

/// One record's features.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureVector {
    /// An image's pixels after resizing and cropping, channel-major (C, H, W), 0 to 255. The
    /// model applies the bundle's scale, mean and std.
    Pixels(Vec<u8>),
    /// Values the model takes as they are: tabular features, and image vectors stored before
    /// pixels were (already normalised).
    Values(Vec<f32>),
}

impl FeatureVector {
    pub fn len(&self) -> usize {
        match self {
            Self::Pixels(p) => p.len(),
            Self::Values(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values the model sees: pixels scaled to 0..1 and normalised by `image`'s mean and
    /// std per channel, values as they are. Pixels without an image spec are refused.
    pub fn to_values(&self, image: Option<&ImageInput>) -> Result<Vec<f32>, SluiceError> {
        match self {
            Self::Values(values) => Ok(values.clone()),
            Self::Pixels(pixels) => {
                let image = image.ok_or_else(|| {
                    SluiceError::permanent(ReasonCode::FeatureShapeMismatch, "pixels stored for a model without images")
                })?;
                Ok(image.normalise(pixels))
            }
        }
    }

    /// The stored form, at the current [`VERSION`].
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.len() * 4);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        match self {
            Self::Values(values) => {
                out.push(KIND_VALUES);
                out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            }
            Self::Pixels(pixels) => {
                out.push(KIND_PIXELS);
                out.extend_from_slice(pixels);
            }
        }
        out
    }

    /// Reads any version up to [`VERSION`]; anything else is refused, saying why.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SluiceError> {
        let Some(rest) = bytes.strip_prefix(&MAGIC) else {
            return values(bytes).map(Self::Values); // version 0: bare f32s
        };
        let refuse = |why: String| SluiceError::permanent(ReasonCode::FeatureShapeMismatch, why);
        let [version, kind, payload @ ..] = rest else {
            return Err(refuse("stored feature vector is cut short in its header".to_owned()));
        };
        if *version > VERSION {
            // Written by a newer build: during a rolling upgrade another worker, of that build,
            // reads it; past the receives, the record is dead-lettered with this cause.
            return Err(SluiceError::retryable(
                ReasonCode::FeatureShapeMismatch,
                format!(
                    "stored feature vector has encoding version {version}; this build reads up to {VERSION} \
                     (written by a newer sluice?)"
                ),
            ));
        }
        if *version != VERSION {
            return Err(refuse(format!("stored feature vector has encoding version {version}, which no build wrote")));
        }
        match *kind {
            KIND_VALUES => values(payload).map(Self::Values),
            KIND_PIXELS => Ok(Self::Pixels(payload.to_vec())),
            other => Err(refuse(format!("stored feature vector has unknown kind {other}"))),
        }
    }
}

fn values(bytes: &[u8]) -> Result<Vec<f32>, SluiceError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(SluiceError::permanent(
            ReasonCode::FeatureShapeMismatch,
            format!("stored feature vector of {} bytes is not whole f32 values", bytes.len()),
        ));
    }
    Ok(f32_from_le_bytes(bytes))
}

/// Little-endian f32s, end to end (the bench's files for ONNX Runtime, version 0 vectors).
pub fn f32_to_le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The inverse of [`f32_to_le_bytes`]; a trailing partial value is ignored.
pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_round_trip() {
        for vector in [FeatureVector::Pixels(vec![0, 7, 255]), FeatureVector::Values(vec![0.5, -1.25, 3e9])] {
            assert_eq!(FeatureVector::from_bytes(&vector.to_bytes()).unwrap(), vector);
        }
        let pixels = FeatureVector::Pixels(vec![9; 224 * 224 * 3]);
        assert_eq!(pixels.to_bytes().len(), 224 * 224 * 3 + HEADER, "a byte a pixel");
    }

    #[test]
    fn reads_vectors_stored_before_versions() {
        let old = f32_to_le_bytes(&[1.0, -0.42, 0.0]);
        assert_eq!(FeatureVector::from_bytes(&old).unwrap(), FeatureVector::Values(vec![1.0, -0.42, 0.0]));
        assert!(f32::from_le_bytes(MAGIC).is_nan(), "no finite first value looks like the magic");
    }

    #[test]
    fn refuses_what_it_cannot_read_saying_why() {
        let mut newer = FeatureVector::Pixels(vec![1, 2]).to_bytes();
        newer[MAGIC.len()] = VERSION + 1;
        let err = FeatureVector::from_bytes(&newer).unwrap_err();
        assert!(err.to_string().contains("newer sluice"), "{err}");
        assert_eq!(err.code(), ReasonCode::FeatureShapeMismatch);
        assert!(FeatureVector::from_bytes(&MAGIC).unwrap_err().to_string().contains("header"));
        assert!(FeatureVector::from_bytes(&[1, 2, 3]).unwrap_err().to_string().contains("3 bytes"));
    }

    #[test]
    fn pixels_become_the_values_the_model_was_trained_on() {
        let image = ImageInput {
            width: 2,
            height: 1,
            channels: 1,
            mean: vec![0.5],
            std: vec![0.25],
            resize_shorter_side: None,
        };
        let values = FeatureVector::Pixels(vec![0, 255]).to_values(Some(&image)).unwrap();
        assert_eq!(values, vec![-2.0, 2.0]);
        assert!(FeatureVector::Pixels(vec![0]).to_values(None).is_err());
    }
}
