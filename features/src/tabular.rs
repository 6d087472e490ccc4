//! JSON events through the bundle's declarative feature spec.

use sluice_core::model::{FieldSpec, TabularSpec};
use sluice_core::{ReasonCode, Result, SluiceError};

/// One event's feature vector: numeric fields scaled to 0..1 (missing → default), categorical
/// fields one-hot (missing or unknown → the default category, or all zeros).
pub fn vectorise(spec: &TabularSpec, event: &serde_json::Value) -> Result<Vec<f32>> {
    let object = event
        .as_object()
        .ok_or_else(|| SluiceError::permanent(ReasonCode::SchemaMismatch, "a JSON event must be an object"))?;
    // The values are checked below, each as it is read.
    spec.check_present(object).map_err(|missing| SluiceError::permanent(ReasonCode::SchemaMismatch, missing))?;
    let mut out = Vec::with_capacity(spec.vector_len());
    for field in &spec.fields {
        let value = object.get(field.name()).filter(|v| !v.is_null());
        match field {
            FieldSpec::Numeric { min, max, default, .. } => {
                let raw = match value {
                    None => *default,
                    Some(v) => field
                        .value(v)
                        .map_err(|wrong| SluiceError::permanent(ReasonCode::SchemaMismatch, wrong))?
                        .unwrap_or(*default),
                };
                out.push((raw - min) / (max - min));
            }
            FieldSpec::Categorical { categories, default, .. } => {
                if let Some(v) = value {
                    field.value(v).map_err(|wrong| SluiceError::permanent(ReasonCode::SchemaMismatch, wrong))?;
                }
                let given = value.map(|v| match v {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                let chosen = given.as_ref().filter(|g| categories.contains(g)).or(default.as_ref());
                out.extend(categories.iter().map(|c| if Some(c) == chosen { 1.0 } else { 0.0 }));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec() -> TabularSpec {
        TabularSpec {
            fields: vec![
                FieldSpec::Numeric { name: "amount".into(), min: 0.0, max: 200.0, default: 50.0, clamp: false },
                FieldSpec::Categorical {
                    name: "country".into(),
                    categories: vec!["de".into(), "fr".into(), "other".into()],
                    default: Some("other".into()),
                },
            ],
            required: Vec::new(),
            min_present: None,
        }
    }

    #[test]
    fn scales_numbers_and_one_hot_encodes_categories() {
        assert_eq!(vectorise(&spec(), &json!({"amount": 100, "country": "fr"})).unwrap(), vec![0.5, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn a_vector_reads_back_as_the_fields_the_model_saw() {
        let vector = vectorise(&spec(), &json!({"amount": 120, "country": "fr"})).unwrap();
        assert_eq!(spec().read_back(&vector).unwrap(), [("amount", "120".to_owned()), ("country", "fr".to_owned())]);
        for (amount, written) in [(0.0, "0"), (0.125, "0.125"), (199.99, "199.99")] {
            let vector = vectorise(&spec(), &json!({ "amount": amount })).unwrap();
            assert_eq!(spec().read_back(&vector).unwrap()[0].1, written);
        }
        let no_default = TabularSpec {
            fields: vec![FieldSpec::Categorical { name: "c".into(), categories: vec!["x".into()], default: None }],
            ..spec()
        };
        let cold = vectorise(&no_default, &json!({"c": "unknown"})).unwrap();
        assert_eq!(no_default.read_back(&cold).unwrap(), [("c", "–".to_owned())]);
        assert_eq!(spec().read_back(&[0.5]), None, "a vector of another length");
    }

    #[test]
    fn fills_defaults_for_missing_and_unknown_values() {
        assert_eq!(vectorise(&spec(), &json!({"country": "jp"})).unwrap(), vec![0.25, 0.0, 0.0, 1.0]);
        assert_eq!(vectorise(&spec(), &json!({"amount": null, "country": "jp"})).unwrap(), vec![0.25, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn an_event_without_the_spec_is_no_prediction() {
        let none = vectorise(&spec(), &json!({"event_id": 5})).unwrap_err();
        assert_eq!(none.code(), ReasonCode::SchemaMismatch);
        assert!(none.detail().contains("0 of the model's 2 fields (amount, country)"), "{none}");
        assert!(vectorise(&spec(), &json!({"amount": null})).is_err(), "null is not there");
        let strict = TabularSpec { required: vec!["country".into()], ..spec() };
        assert!(vectorise(&strict, &json!({"amount": 3})).unwrap_err().detail().contains("country"));
        let most = TabularSpec { min_present: Some(1.0), ..spec() };
        assert!(vectorise(&most, &json!({"amount": 3})).is_err());
        assert!(vectorise(&most, &json!({"amount": 3, "country": "de"})).is_ok());
    }

    /// A number outside its field's range is refused, so no prediction is made of an input the
    /// model never saw the like of; a field that clamps takes it to the nearer end.
    #[test]
    fn a_number_out_of_its_range_is_refused_unless_the_field_clamps() {
        for amount in [json!(200.5), json!(-1), json!(1e300)] {
            let err = vectorise(&spec(), &json!({ "amount": amount })).unwrap_err();
            assert_eq!(err.code(), ReasonCode::SchemaMismatch);
            assert!(err.detail().contains("outside its range 0 to 200"), "{err}");
        }
        assert_eq!(vectorise(&spec(), &json!({"amount": 200})).unwrap()[0], 1.0);
        // A bound that f32 cannot hold exactly is the bound still.
        let mut tenths = spec();
        if let FieldSpec::Numeric { min, max, .. } = &mut tenths.fields[0] {
            (*min, *max) = (0.1, 0.7);
        }
        assert_eq!(vectorise(&tenths, &json!({"amount": 0.7})).unwrap()[0], 1.0);
        assert_eq!(vectorise(&tenths, &json!({"amount": 0.1})).unwrap()[0], 0.0);
        let mut clamped = spec();
        if let FieldSpec::Numeric { clamp, .. } = &mut clamped.fields[0] {
            *clamp = true;
        }
        assert_eq!(vectorise(&clamped, &json!({"amount": 1e300})).unwrap()[0], 1.0);
        assert_eq!(vectorise(&clamped, &json!({"amount": -4})).unwrap()[0], 0.0);
    }

    #[test]
    fn rejects_wrong_types() {
        let err = vectorise(&spec(), &json!({"amount": "lots"})).unwrap_err();
        assert_eq!(err.code(), ReasonCode::SchemaMismatch);
        assert!(vectorise(&spec(), &json!([1, 2])).is_err());
        // A category is a string (a number or boolean is compared as written), never a structure.
        let err = vectorise(&spec(), &json!({"country": {"code": "de"}})).unwrap_err();
        assert!(err.detail().contains("field \"country\" must be one of its categories"), "{err}");
        assert!(vectorise(&spec(), &json!({"country": ["de"]})).is_err());
        assert_eq!(vectorise(&spec(), &json!({"country": 5})).unwrap(), vec![0.25, 0.0, 0.0, 1.0]);
    }
}
