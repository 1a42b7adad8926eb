//! `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`: vLLM's endpoints for
//! adding and removing LoRA adapters while serving, with `--allow-runtime-lora-updating` (vLLM's
//! `VLLM_ALLOW_RUNTIME_LORA_UPDATING`). Their bodies and answers are vLLM's: `{"lora_name",
//! "lora_path"}` (and turbine's `scale`), `{"lora_name"}`; 200 with a line of text.
//!
//! A load builds the adapter on every device's worker, between batches (a batch in flight
//! finishes first; the batches after it wait for the build), and serves the name once every
//! device has it. An unload stops serving the name at once; the requests that named it before
//! finish with it, and its weights leave the devices after the last of them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::adapters::{Refused, Retired};
use super::error::ApiError;
use super::routes;
use super::validate::{echoed, Fields};
use super::worker::AdapterCommand;
use super::App;
use crate::model::loader::LoadError;
use crate::model::lora::{AdapterSpec, LoraSpec};

/// How often an unloaded adapter's requests are looked at until none is left.
const DRAIN_CHECK: Duration = Duration::from_millis(50);

fn enabled(app: &App) -> Result<(), ApiError> {
    if app.config.runtime_lora_updating {
        Ok(())
    } else {
        Err(ApiError::NotFound(
            "loading and unloading LoRA adapters while serving is off: start the server with \
             --allow-runtime-lora-updating (TURBINE_ALLOW_RUNTIME_LORA_UPDATING=true)"
                .into(),
        ))
    }
}

/// The request's JSON object, fields other than `known` refused; once the flag is checked.
async fn fields(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Body,
    known: &[&str],
) -> Result<serde_json::Map<String, Value>, ApiError> {
    enabled(app)?;
    routes::json_object(app, headers, body, app.config.limits.max_body_bytes, known).await
}

fn success(message: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

/// The LoRA's scale: `scale` (turbine's; 1 when absent), a finite number.
fn scale(fields: &serde_json::Map<String, Value>) -> Result<f64, ApiError> {
    match fields.get("scale") {
        None | Some(Value::Null) => Ok(1.0),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s) if s.is_finite() && s.abs() <= 1e6 => Ok(s),
            _ => Err(ApiError::invalid(
                "scale",
                "invalid_value",
                format!("scale must be a number between -1e6 and 1e6, got {n}"),
            )),
        },
        Some(other) => Err(ApiError::invalid(
            "scale",
            "invalid_type",
            format!(
                "scale must be a number, got {}",
                super::validate::json_kind(other)
            ),
        )),
    }
}

/// `POST /v1/load_lora_adapter`: `{"lora_name": NAME, "lora_path": FILE, "scale": S}` builds
/// the LoRA in FILE (a `.safetensors` file on the server: diffusers', PEFT's or kohya's names)
/// into an adapter served as the model NAME, as `--lora-modules NAME=FILE:S` does at start-up.
pub async fn load(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let fields = fields(
        &app,
        &headers,
        body,
        &["lora_name", "lora_path", "scale", "load_inplace"],
    )
    .await?;
    let f = Fields(&fields);
    let name = f.required_string("lora_name")?.to_string();
    let path = f.required_string("lora_path")?;
    let scale = scale(&fields)?;
    if f.boolean("load_inplace")? == Some(true) {
        return Err(ApiError::invalid(
            "load_inplace",
            "unsupported_value",
            "load_inplace is not supported: unload the adapter, then load it again",
        ));
    }
    if let Some(problem) = app.config.model.adapter_name_problem(&name, "lora_name") {
        return Err(ApiError::invalid("lora_name", "invalid_value", problem));
    }
    if path.trim().is_empty() {
        return Err(ApiError::invalid(
            "lora_path",
            "invalid_value",
            "lora_path must name a LoRA's .safetensors file on the server",
        ));
    }
    let spec = AdapterSpec {
        name: name.clone(),
        loras: vec![LoraSpec {
            path: PathBuf::from(path),
            scale,
        }],
    };
    let adapters = &app.config.model.adapters;
    let slot = adapters
        .reserve(&name, app.config.max_lora_modules)
        .map_err(|refused| match refused {
            Refused::Taken => ApiError::invalid(
                "lora_name",
                "lora_adapter_exists",
                format!(
                    "The lora adapter '{}' has already been loaded.",
                    echoed(&name)
                ),
            ),
            Refused::Full { limit } => ApiError::invalid(
                "lora_name",
                "too_many_lora_adapters",
                format!(
                    "{limit} LoRA adapters are loaded (--max-lora-modules {limit}; those \
                     still finishing their requests after an unload count until they are \
                     done): unload one first"
                ),
            ),
        })?;
    // Its own task: a client that goes away does not leave the slot half built.
    let task = tokio::spawn(build_everywhere(app.clone(), slot, spec));
    match task.await {
        Ok(Ok(())) => Ok(success(format!(
            "Success: LoRA adapter '{name}' added successfully."
        ))),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(ApiError::Panicked(e.to_string())),
    }
}

/// Builds `spec` into `slot` on every device, and serves it; or frees the slot again.
async fn build_everywhere(app: Arc<App>, slot: u16, spec: AdapterSpec) -> Result<(), ApiError> {
    let adapters = &app.config.model.adapters;
    let workers = app.adapter_commands();
    let results = on_every_device(&workers, |done| AdapterCommand::Load {
        slot,
        spec: spec.clone(),
        done,
    })
    .await;
    let built = results.iter().filter(|r| r.is_ok()).count();
    let failure = results.into_iter().find_map(Result::err);
    let outcome = match failure {
        None if built > 0 => Ok(()),
        None => Err(ApiError::AdapterNotBuilt(
            "no device is left to build the adapter on".into(),
        )),
        // The file's fault, unless the device ran out of memory building it.
        Some(e) => Err(
            if e.downcast_ref::<LoadError>().is_some()
                && !crate::device::is_out_of_memory(&format!("{e:#}"))
            {
                ApiError::invalid(
                    "lora_path",
                    "invalid_lora_adapter",
                    format!("The lora adapter '{}' cannot be loaded: {e:#}", spec.name),
                )
            } else {
                ApiError::AdapterNotBuilt(format!(
                    "The lora adapter '{}' could not be built on the device: {e:#}",
                    spec.name
                ))
            },
        ),
    };
    match &outcome {
        Ok(()) => {
            app.metrics.adapter_loaded(slot, &spec.name);
            adapters.publish(slot);
            app.metrics.adapter_update("load", "ok");
            tracing::info!(adapter = %spec.name, slot, path = %spec.loras[0].path.display(), "LoRA adapter loaded on every device; served");
        }
        Err(_) => {
            // Where it was built, it goes again.
            unload_everywhere(&workers, slot).await;
            adapters.release(slot);
            app.metrics.adapter_update("load", "failed");
        }
    }
    outcome
}

/// Frees `slot` on every device.
async fn unload_everywhere(workers: &[mpsc::UnboundedSender<AdapterCommand>], slot: u16) {
    on_every_device(workers, |done| AdapterCommand::Unload { slot, done }).await;
}

/// Sends `command` to every device's batcher (which passes it on to the worker between
/// batches) and waits for the answers; a device that failed meanwhile answers nothing and
/// serves nothing more.
async fn on_every_device<T>(
    workers: &[mpsc::UnboundedSender<AdapterCommand>],
    command: impl Fn(oneshot::Sender<T>) -> AdapterCommand,
) -> Vec<T> {
    let mut replies = Vec::new();
    for tx in workers {
        let (done, reply) = oneshot::channel();
        if tx.send(command(done)).is_ok() {
            replies.push(reply);
        }
    }
    let mut answers = Vec::new();
    for reply in replies {
        if let Ok(answer) = reply.await {
            answers.push(answer);
        }
    }
    answers
}

/// `POST /v1/unload_lora_adapter`: `{"lora_name": NAME}` stops serving the adapter NAME (a
/// `--lora-modules` one too). Requests that named it before finish with it; its weights are
/// freed after the last of them.
pub async fn unload(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let fields = fields(&app, &headers, body, &["lora_name", "lora_int_id"]).await?;
    let name = Fields(&fields).required_string("lora_name")?.to_string();
    let Some(retired) = app.config.model.adapters.retire(&name) else {
        app.metrics.adapter_update("unload", "failed");
        return Err(ApiError::NotFound(format!(
            "The lora adapter '{}' cannot be found.",
            echoed(&name)
        )));
    };
    app.metrics.adapter_update("unload", "ok");
    tracing::info!(adapter = %name, slot = retired.slot, "LoRA adapter unloaded: no longer served; freed once its requests under way are done");
    tokio::spawn(free_when_drained(app.clone(), retired));
    Ok(success(format!(
        "Success: LoRA adapter '{name}' removed successfully."
    )))
}

/// Frees `retired`'s slot on the devices once no request holds it.
async fn free_when_drained(app: Arc<App>, retired: Retired) {
    while retired.in_use() {
        tokio::time::sleep(DRAIN_CHECK).await;
    }
    let slot = retired.slot;
    unload_everywhere(&app.adapter_commands(), slot).await;
    app.metrics.adapter_slot_freed(slot);
    app.config.model.adapters.release(slot);
    tracing::debug!(slot, "an unloaded LoRA adapter's weights freed");
}
