//! Both CLIP text encoders vs transformers (scripts/fixtures/ref_clip.py).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use turbine::model::clip::{ClipTextConfig, ClipTextModel, ClipTextOutput};
use turbine::model::loader::{find_weights, Weights};
use turbine::model::tokenizer::ClipTokenizer;

use crate::common;

fn prompts() -> Vec<String> {
    let p = common::fixtures().join("reference/clip.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let json = &meta.metadata().as_ref().unwrap()["prompts"];
    serde_json::from_str(json).unwrap()
}

/// Builds encoder `folder`, checks every checkpoint tensor was read, runs `ids`.
fn run(folder: &str, with_projection: bool, dtype: DType, ids: &Tensor) -> ClipTextOutput {
    let dir = common::tiny_model().join(folder);
    let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
    let weights =
        Weights::open(&find_weights(&dir, "model").unwrap(), dtype, &Device::Cpu).unwrap();
    let model = ClipTextModel::new(weights.vb.clone(), &cfg, with_projection).unwrap();
    weights.ensure_all_used().unwrap();
    model.forward(ids).unwrap()
}

struct Case {
    folder: &'static str,
    tokenizer: &'static str,
    with_projection: bool,
    ids: &'static str,
    penultimate: &'static str,
    pooled: &'static str,
}

const CASES: [Case; 2] = [
    Case {
        folder: "text_encoder",
        tokenizer: "tokenizer",
        with_projection: false,
        ids: "ids_1",
        penultimate: "te1_penultimate",
        pooled: "te1_pooled",
    },
    Case {
        folder: "text_encoder_2",
        tokenizer: "tokenizer_2",
        with_projection: true,
        ids: "ids_2",
        penultimate: "te2_penultimate",
        pooled: "te2_text_embeds",
    },
];

fn reference() -> HashMap<String, Tensor> {
    common::reference("clip")
}

#[test]
fn encoders_match_transformers_f32() {
    let r = reference();
    let prompts = prompts();
    let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    assert!(texts.len() >= 3);
    for case in &CASES {
        let ids = r[case.ids].to_dtype(DType::U32).unwrap();
        // Our tokenizer gives the ids transformers gave.
        let tok = ClipTokenizer::from_dir(&common::tiny_model().join(case.tokenizer)).unwrap();
        let ours_ids = tok.encode_batch(&texts, &Device::Cpu).unwrap();
        assert_eq!(
            ours_ids.to_vec2::<u32>().unwrap(),
            ids.to_vec2::<u32>().unwrap(),
            "{}: token ids differ",
            case.tokenizer
        );

        let out = run(case.folder, case.with_projection, DType::F32, &ids);
        common::assert_close(
            &format!("{} penultimate", case.folder),
            &out.penultimate,
            &r[case.penultimate],
            1e-4,
        );
        common::assert_close(
            &format!("{} pooled", case.folder),
            &out.pooled,
            &r[case.pooled],
            1e-4,
        );
    }
}

/// bf16 weights and activations: finite and near the f32 run.
#[test]
fn encoders_bf16_close_to_f32() {
    let r = reference();
    for case in &CASES {
        let ids = r[case.ids].to_dtype(DType::U32).unwrap();
        let f32_out = run(case.folder, case.with_projection, DType::F32, &ids);
        let bf16_out = run(case.folder, case.with_projection, DType::BF16, &ids);
        for (what, a, b) in [
            ("penultimate", &bf16_out.penultimate, &f32_out.penultimate),
            ("pooled", &bf16_out.pooled, &f32_out.pooled),
        ] {
            assert_eq!(a.dtype(), DType::BF16);
            let a32 = a.to_dtype(DType::F32).unwrap();
            let finite = a32
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|x| x.is_finite());
            assert!(finite, "{} {what}: non-finite bf16 output", case.folder);
            common::assert_close(
                &format!("{} {what} bf16 vs f32", case.folder),
                &a32,
                b,
                5e-2,
            );
        }
    }
}

/// A prompt's row gives the same output alone as in a batch.
#[test]
fn batch_rows_are_independent() {
    let r = reference();
    let ids = r["ids_2"].to_dtype(DType::U32).unwrap();
    let batch = run("text_encoder_2", true, DType::F32, &ids);
    let single = run(
        "text_encoder_2",
        true,
        DType::F32,
        &ids.narrow(0, 2, 1).unwrap(),
    );
    common::assert_close(
        "row 2 alone vs in batch",
        &single.pooled,
        &batch.pooled.narrow(0, 2, 1).unwrap(),
        1e-6,
    );
}

/// transformers v5 saves a bare `CLIPTextModel` without the `text_model.` prefix; such a file
/// loads into the same model.
#[test]
fn unprefixed_checkpoint_loads_identically() {
    let r = reference();
    let ids = r["ids_1"].to_dtype(DType::U32).unwrap();
    let dir = common::tiny_model().join("text_encoder");
    let tensors =
        candle_core::safetensors::load(find_weights(&dir, "model").unwrap(), &Device::Cpu).unwrap();
    let stripped: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap_or(&k).to_string(), v))
        .collect();
    assert!(stripped.contains_key("embeddings.token_embedding.weight"));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("model.safetensors");
    candle_core::safetensors::save(&stripped, &path).unwrap();

    let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&path, DType::F32, &Device::Cpu).unwrap();
    let model = ClipTextModel::new(weights.vb.clone(), &cfg, false).unwrap();
    weights.ensure_all_used().unwrap();
    let out = model.forward(&ids).unwrap();
    common::assert_close(
        "unprefixed penultimate",
        &out.penultimate,
        &r["te1_penultimate"],
        1e-4,
    );
    common::assert_close("unprefixed pooled", &out.pooled, &r["te1_pooled"], 1e-4);
}

/// `forward_ids` (host ids, what the pipeline calls so that nothing is read back from the GPU)
/// and `penultimate_ids` are `forward` on the same ids, bit for bit, for both encoders and their
/// pooling rules; and a flat id list that does not split into the rows asked for is named.
#[test]
fn host_ids_encode_as_the_tensor_does() {
    let r = reference();
    for case in &CASES {
        let dir = common::tiny_model().join(case.folder);
        let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
        let weights = Weights::open(
            &find_weights(&dir, "model").unwrap(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let model = ClipTextModel::new(weights.vb.clone(), &cfg, case.with_projection).unwrap();
        let ids = r[case.ids].to_dtype(DType::U32).unwrap();
        let (b, _) = ids.dims2().unwrap();
        let flat: Vec<u32> = ids.flatten_all().unwrap().to_vec1().unwrap();
        let from_tensor = model.forward(&ids).unwrap();
        let from_host = model.forward_ids(&flat, b, &Device::Cpu).unwrap();
        // What the pipeline takes from the first encoder: the penultimate layer alone.
        let penultimate = model.penultimate_ids(&flat, b, &Device::Cpu).unwrap();
        for (what, got, want) in [
            (
                "forward_ids penultimate",
                &from_host.penultimate,
                &from_tensor.penultimate,
            ),
            ("forward_ids pooled", &from_host.pooled, &from_tensor.pooled),
            ("penultimate_ids", &penultimate, &from_tensor.penultimate),
        ] {
            assert_eq!(got.dims(), want.dims(), "{} {what}", case.folder);
            let same = got.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(same, "{} {what}: differs from forward", case.folder);
        }
        common::assert_close(case.pooled, &from_host.pooled, &r[case.pooled], 1e-4);
        let err = model
            .forward_ids(&flat[1..], b, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not split into"), "{err}");
        assert!(model.forward_ids(&flat, 0, &Device::Cpu).is_err());
    }
}
