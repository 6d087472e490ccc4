//! The fallback: the same feature vectors sent to a SageMaker endpoint running the built-in
//! XGBoost algorithm (`InvokeEndpoint`, `text/csv` rows in, JSON or CSV probabilities out).
//!
//! The SDK's standard retry policy already backs off on throttling and 5xx (503 included); what
//! is left after it is classified here: transient trouble is retryable (the worker loop backs
//! off and the batch comes back), and so is a `ModelError` (424) for the container's own 5xx or
//! timeout; one for its 4xx, or a request the runtime refuses, is permanent (the records go to
//! the inference DLQ with reason `fallback_failure`, ready for replay), except while Candle is
//! down only for the moment, when the batch is retried for Candle to take
//! (`while_the_model_is_down` in lib.rs). An endpoint that does not exist, or a role not allowed
//! to call it, is the deployment's to fix (`misconfigured`: the worker stops, the records wait).

use aws_sdk_sagemakerruntime::config::http::HttpResponse;
use aws_sdk_sagemakerruntime::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sagemakerruntime::operation::invoke_endpoint::InvokeEndpointError;
use aws_sdk_sagemakerruntime::primitives::Blob;
use serde::{Deserialize, Serialize};
use sluice_core::config::AwsConfig;
use sluice_core::{ReasonCode, SluiceError};
use tokio::sync::OnceCell;

/// SageMaker's limit on an InvokeEndpoint request body.
pub const PAYLOAD_LIMIT: usize = 6 * 1024 * 1024;

/// `[inference.sagemaker]`: the fallback endpoint. No `endpoint_name`, no fallback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SageMakerConfig {
    /// The endpoint serving the XGBoost model.
    pub endpoint_name: Option<String>,
    /// A local stand-in for the SageMaker runtime (e.g. `http://127.0.0.1:8080`); credentials
    /// and region come from `[store.aws]` and the standard chain either way.
    pub endpoint_url: Option<String>,
    /// The name and version results record for predictions the endpoint served.
    pub model_name: String,
    pub model_version: String,
    /// Rows are batched into requests no larger than this (SageMaker's limit is 6 MB).
    pub max_payload_bytes: usize,
}

impl Default for SageMakerConfig {
    fn default() -> Self {
        Self {
            endpoint_name: None,
            endpoint_url: None,
            model_name: "digits-xgboost".to_owned(),
            model_version: "1".to_owned(),
            max_payload_bytes: 5 * 1024 * 1024,
        }
    }
}

/// What results record as the backend of a prediction the endpoint served.
pub const BACKEND: &str = "sagemaker-xgboost";

pub struct SageMakerFallback {
    endpoint: String,
    config: SageMakerConfig,
    aws: AwsConfig,
    /// Made on first use: loading credentials is async and most batches never need it.
    client: OnceCell<aws_sdk_sagemakerruntime::Client>,
}

impl SageMakerFallback {
    /// The fallback `config` describes, if it names an endpoint.
    pub fn new(config: &SageMakerConfig, aws: &AwsConfig) -> Option<Self> {
        let endpoint = config.endpoint_name.clone()?;
        Some(Self { endpoint, config: config.clone(), aws: aws.clone(), client: OnceCell::new() })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn model(&self) -> (&str, &str) {
        (&self.config.model_name, &self.config.model_version)
    }

    async fn client(&self) -> &aws_sdk_sagemakerruntime::Client {
        self.client
            .get_or_init(|| async {
                let shared =
                    sluice_core::backend::aws::sdk_config(&self.aws, self.config.endpoint_url.as_deref()).await;
                let conf = aws_sdk_sagemakerruntime::config::Builder::from(&shared)
                    .interceptor(sluice_core::backend::aws::requests().clone())
                    .build();
                aws_sdk_sagemakerruntime::Client::from_conf(conf)
            })
            .await
    }

    /// Class probabilities for `inputs` (rows of `width` values laid end to end), `classes` per
    /// row, in the order of the bundle's labels.
    pub async fn predict(&self, inputs: &[f32], width: usize, classes: usize) -> Result<Vec<Vec<f32>>, SluiceError> {
        let mut out = Vec::with_capacity(inputs.len() / width.max(1));
        for (body, rows) in csv_requests(inputs, width, self.config.max_payload_bytes.min(PAYLOAD_LIMIT)) {
            let response = self
                .client()
                .await
                .invoke_endpoint()
                .endpoint_name(&self.endpoint)
                .content_type("text/csv")
                .accept("application/json")
                .body(Blob::new(body))
                .send()
                .await
                .map_err(|e| classify(&self.endpoint, e))?;
            let body = response.body.map(Blob::into_inner).unwrap_or_default();
            let text = String::from_utf8(body).map_err(|_| invalid("the response is not UTF-8"))?;
            out.extend(parse_response(&text, response.content_type.as_deref(), rows, classes)?);
        }
        Ok(out)
    }
}

/// Rows as CSV (no header, no label column), split into request bodies of at most `max_bytes`
/// (a single row longer than that still goes, alone). Each body comes with its row count.
pub fn csv_requests(inputs: &[f32], width: usize, max_bytes: usize) -> Vec<(String, usize)> {
    let mut requests = Vec::new();
    let (mut body, mut rows) = (String::new(), 0);
    for row in inputs.chunks(width.max(1)) {
        let mut line = row.iter().map(f32::to_string).collect::<Vec<_>>().join(",");
        line.push('\n');
        if rows > 0 && body.len() + line.len() > max_bytes {
            requests.push((std::mem::take(&mut body), rows));
            rows = 0;
        }
        body.push_str(&line);
        rows += 1;
    }
    if rows > 0 {
        requests.push((body, rows));
    }
    requests
}

/// Reads the container's answer for `rows` rows: JSON (`{"predictions": [{"score": …}]}`) or
/// CSV, one line per row or every value on one line. A multi-class model must be trained with
/// `multi:softprob` (a score vector per row); a binary model's single score is P(class 1).
pub fn parse_response(
    body: &str,
    content_type: Option<&str>,
    rows: usize,
    classes: usize,
) -> Result<Vec<Vec<f32>>, SluiceError> {
    let json = content_type.is_some_and(|t| t.contains("json")) || body.trim_start().starts_with('{');
    let scores: Vec<Vec<f32>> = if json { json_scores(body)? } else { csv_scores(body, rows, classes)? };
    if scores.len() != rows {
        return Err(invalid(format!("{} predictions for {rows} rows", scores.len())));
    }
    // Probabilities, as binary:logistic and multi:softprob give them: a margin (binary:logitraw)
    // or a regression's value would be taken for a confidence.
    if let Some(v) = scores.iter().flatten().find(|v| !(0.0..=1.0).contains(*v)) {
        return Err(invalid(format!(
            "score {v} is not a probability (the endpoint must be trained with binary:logistic or multi:softprob)"
        )));
    }
    scores
        .into_iter()
        .map(|score| match score.len() {
            n if n == classes => Ok(score),
            1 if classes == 2 => Ok(vec![1.0 - score[0], score[0]]),
            n => Err(invalid(format!(
                "{n} scores per row for {classes} classes (a multi-class endpoint must use multi:softprob)"
            ))),
        })
        .collect()
}

#[derive(Deserialize)]
struct JsonPredictions {
    predictions: Vec<JsonScore>,
}

#[derive(Deserialize)]
struct JsonScore {
    score: Score,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Score {
    One(f32),
    Many(Vec<f32>),
}

fn json_scores(body: &str) -> Result<Vec<Vec<f32>>, SluiceError> {
    let parsed: JsonPredictions = serde_json::from_str(body).map_err(|e| invalid(format!("JSON response: {e}")))?;
    Ok(parsed
        .predictions
        .into_iter()
        .map(|p| match p.score {
            Score::One(v) => vec![v],
            Score::Many(v) => v,
        })
        .collect())
}

fn csv_scores(body: &str, rows: usize, classes: usize) -> Result<Vec<Vec<f32>>, SluiceError> {
    let parse_line = |line: &str| -> Result<Vec<f32>, SluiceError> {
        line.split(',')
            .map(|v| v.trim().parse::<f32>().map_err(|_| invalid(format!("CSV response value {v:?}"))))
            .collect()
    };
    let lines: Vec<&str> = body.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.len() == rows {
        return lines.into_iter().map(parse_line).collect();
    }
    // Every value on one line: `classes` (or one, for a binary model) per row, in row order.
    let values = parse_line(&lines.join(","))?;
    let per_row = if values.len() == rows * classes { classes } else { 1 };
    Ok(values.chunks(per_row).map(<[f32]>::to_vec).collect())
}

fn invalid(detail: impl Into<String>) -> SluiceError {
    SluiceError::permanent(ReasonCode::InvalidModelOutput, format!("SageMaker endpoint: {}", detail.into()))
}

fn classify(endpoint: &str, error: SdkError<InvokeEndpointError, HttpResponse>) -> SluiceError {
    let detail = |what: String| format!("InvokeEndpoint {endpoint}: {what}");
    match &error {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("Unknown");
            let message = service.err().message().unwrap_or_default();
            let status = service.raw().status().as_u16();
            let detail = detail(format!("{code} ({status}): {message}"));
            // A ModelError (424) wraps the container's own answer: a 4xx is its answer to this
            // input; a 5xx, a timeout or no answer at all is the container failing for now.
            if let InvokeEndpointError::ModelError(model) = service.err() {
                let container = model.original_status_code().unwrap_or(0);
                return if (400..500).contains(&container) && !matches!(container, 408 | 429) {
                    SluiceError::permanent(ReasonCode::FallbackFailure, detail)
                } else {
                    SluiceError::retryable(ReasonCode::FallbackFailure, detail)
                };
            }
            let transient = matches!(
                code,
                "ThrottlingException"
                    | "ServiceUnavailable"
                    | "InternalFailure"
                    | "InternalDependencyException"
                    | "ModelNotReadyException"
            ) || sluice_core::backend::aws::transient_status(status);
            // An endpoint that does not exist is a ValidationError that says so.
            let missing = code == "ValidationError" && message.contains("not found");
            if transient {
                SluiceError::retryable(ReasonCode::FallbackFailure, detail)
            } else if missing {
                SluiceError::permanent(
                    ReasonCode::Misconfigured,
                    format!("{detail} (does inference.sagemaker.endpoint_name name an endpoint in this region?)"),
                )
            } else if let Some(hint) = sluice_core::backend::aws::misconfiguration(code, status) {
                SluiceError::permanent(ReasonCode::Misconfigured, format!("{detail} ({hint})"))
            } else {
                SluiceError::permanent(ReasonCode::FallbackFailure, detail)
            }
        }
        SdkError::ConstructionFailure(_) => {
            SluiceError::permanent(ReasonCode::Internal, detail(sluice_core::backend::aws::display_chain(&error)))
        }
        _ => SluiceError::retryable(
            ReasonCode::FallbackFailure,
            detail(sluice_core::backend::aws::display_chain(&error)),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_split_under_the_payload_limit() {
        let inputs: Vec<f32> = (0..12).map(|i| i as f32 / 4.0).collect();
        let one = csv_requests(&inputs, 3, 1_000);
        assert_eq!(one, vec![("0,0.25,0.5\n0.75,1,1.25\n1.5,1.75,2\n2.25,2.5,2.75\n".to_owned(), 4)]);
        let split = csv_requests(&inputs, 3, 25);
        assert_eq!(split.iter().map(|(_, n)| n).sum::<usize>(), 4);
        assert!(split.iter().all(|(body, n)| body.len() <= 25 || *n == 1), "{split:?}");
        assert_eq!(split.iter().map(|(b, _)| b.as_str()).collect::<String>(), one[0].0);
    }

    #[test]
    fn json_and_both_csv_shapes_parse() {
        let json = r#"{"predictions": [{"score": [0.25, 0.75]}, {"score": [0.5, 0.5]}]}"#;
        let want = vec![vec![0.25, 0.75], vec![0.5, 0.5]];
        assert_eq!(parse_response(json, Some("application/json"), 2, 2).unwrap(), want);
        assert_eq!(parse_response("0.25,0.75\n0.5,0.5\n", Some("text/csv"), 2, 2).unwrap(), want);
        assert_eq!(parse_response("0.25,0.75,0.5,0.5", Some("text/csv"), 2, 2).unwrap(), want);
        // A binary model's one score per row is P(class 1).
        assert_eq!(parse_response("0.75,0.5", Some("text/csv"), 2, 2).unwrap(), want);
        assert_eq!(parse_response(r#"{"predictions":[{"score":0.75}]}"#, None, 1, 2).unwrap(), vec![vec![0.25, 0.75]]);
    }

    #[test]
    fn answers_that_do_not_fit_are_invalid_output() {
        for (body, rows, classes) in [
            (r#"{"predictions": [{"score": [0.1, 0.9]}]}"#, 2, 2),
            ("3\n1\n", 2, 10),
            ("0.1,x", 1, 2),
            ("not json {", 1, 2),
            // A margin, not a probability (binary:logitraw).
            ("2.5\n-1.0\n", 2, 2),
            ("NaN", 1, 2),
        ] {
            let error = parse_response(body, None, rows, classes).unwrap_err();
            assert_eq!(error.code(), ReasonCode::InvalidModelOutput, "{body}");
        }
    }
}
