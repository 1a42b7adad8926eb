//! LoRAs (`--lora FILE[:SCALE]`), fused into the weights as they are loaded: `W + scale *
//! alpha / rank * up @ down` for each module a LoRA adapts, so a LoRA costs nothing per image.
//!
//! Two layouts are read, the two SDXL LoRAs are shared in:
//!
//! ```text
//! kohya-ss (A1111, ComfyUI, Civitai):  lora_unet_<module>.lora_down.weight  [r, in(, kh, kw)]
//!                                      lora_unet_<module>.lora_up.weight    [out, r(, 1, 1)]
//!                                      lora_unet_<module>.alpha             scalar (default r)
//!   <module>: the module's name with `_` for `.`, the UNet's in its original (SGM) naming as
//!   kohya's SDXL trainer writes it (input_blocks_4_1_transformer_blocks_0_attn1_to_q) or in
//!   diffusers' (down_blocks_1_attentions_0_...); lora_te1_ / lora_te_ and lora_te2_ for the
//!   two text encoders.
//! diffusers / PEFT (save_lora_weights):  unet.<module>.lora_A.weight, .lora_B.weight
//!                                        text_encoder.<module>..., text_encoder_2.<module>...
//! ```
//!
//! Every module of a LoRA must land on a weight of the model, with matching shapes, or loading
//! fails naming the ones that did not: a LoRA for another model (SD 1.5, say) is refused rather
//! than half applied. LyCORIS' other kinds (LoHa, LoKr) and DoRA are refused by name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::checkpoint::{original, Layout, Part, UNET_PREFIX};
use super::loader::{LoadError, LoadResult};

/// `--lora FILE[:SCALE]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

impl LoraSpec {
    /// `FILE` (scale 1) or `FILE:SCALE`; a path that itself holds a `:` is taken whole unless
    /// what follows the last `:` is a number.
    pub fn parse(s: &str) -> Result<Self, String> {
        Self::parse_in(s, "--lora", "--lora FILE or --lora FILE:SCALE")
    }

    /// [`Self::parse`], its errors naming `flag` and its `usage`.
    fn parse_in(s: &str, flag: &str, usage: &str) -> Result<Self, String> {
        let (path, scale) = match s.rsplit_once(':') {
            Some((path, scale)) if !path.is_empty() => match scale.trim().parse::<f64>() {
                Ok(v) => (path, v),
                Err(_) => (s, 1.0),
            },
            _ => (s, 1.0),
        };
        if !scale.is_finite() {
            return Err(format!("{flag} {s}: the scale must be a finite number"));
        }
        if path.is_empty() {
            return Err(format!("{flag} needs a file: {usage}"));
        }
        Ok(Self {
            path: PathBuf::from(path),
            scale,
        })
    }
}

/// `--lora-modules NAME=FILE[:SCALE]`: a LoRA served under its own model name, next to the
/// model itself (vLLM's flag). Several specs with one name stack their LoRAs in one adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// The model name requests give in `model` to get images with these LoRAs.
    pub name: String,
    pub loras: Vec<LoraSpec>,
}

impl AdapterSpec {
    /// `NAME=FILE` or `NAME=FILE:SCALE`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let usage = "--lora-modules NAME=FILE or --lora-modules NAME=FILE:SCALE";
        let (name, lora) = s
            .split_once('=')
            .ok_or_else(|| format!("--lora-modules needs a name: {usage}, got {s:?}"))?;
        let name = name.trim();
        if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{usage}: the name {name:?} must be non-empty, without spaces"
            ));
        }
        if name.ends_with('*') {
            return Err(format!(
                "--lora-modules {s}: a name ending in `*` would read as a prefix; name it plainly"
            ));
        }
        let lora = LoraSpec::parse_in(lora, "--lora-modules", usage)?;
        Ok(Self {
            name: name.to_string(),
            loras: vec![lora],
        })
    }

    /// One adapter per name, in the order the names first appear, each with its specs' LoRAs
    /// in order.
    pub fn merged(specs: &[AdapterSpec]) -> Vec<AdapterSpec> {
        let mut out: Vec<AdapterSpec> = Vec::new();
        for spec in specs {
            match out.iter_mut().find(|a| a.name == spec.name) {
                Some(a) => a.loras.extend(spec.loras.iter().cloned()),
                None => out.push(spec.clone()),
            }
        }
        out
    }
}

/// One adapted module: `up @ down`, scaled by `alpha / rank`.
struct Module {
    down: Tensor,
    up: Tensor,
    alpha: Option<f64>,
}

/// A LoRA file, read into memory (LoRAs are small), with what the model has taken from it.
pub struct Lora {
    path: PathBuf,
    scale: f64,
    modules: BTreeMap<String, Module>,
    used: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for Lora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lora")
            .field("path", &self.path)
            .field("scale", &self.scale)
            .field("modules", &self.modules.len())
            .finish()
    }
}

/// A module's down and up weights and alpha, as the keys are read.
type Halves = (Option<Tensor>, Option<Tensor>, Option<f64>);

/// Which half of a module a key holds.
enum Half {
    Down,
    Up,
    Alpha,
}

/// A LoRA key's module stem and half, or `None` for a key no layout here has.
fn parse_key(key: &str) -> Option<(&str, Half)> {
    const SUFFIXES: [(&str, Half); 7] = [
        (".lora_down.weight", Half::Down),
        (".lora_up.weight", Half::Up),
        (".lora_A.weight", Half::Down),
        (".lora_B.weight", Half::Up),
        (".lora.down.weight", Half::Down),
        (".lora.up.weight", Half::Up),
        (".alpha", Half::Alpha),
    ];
    SUFFIXES
        .into_iter()
        .find_map(|(suffix, half)| key.strip_suffix(suffix).map(|stem| (stem, half)))
}

/// The file name diffusers' `save_lora_weights` writes in its folder (and many LoRAs on the
/// Hub carry).
pub const DIFFUSERS_LORA_FILE: &str = "pytorch_lora_weights.safetensors";

/// The LoRA file `path` names: the file itself, or in a folder (as diffusers saves a LoRA, and
/// as vLLM's `lora_path` names one) [`DIFFUSERS_LORA_FILE`], else its only `.safetensors` file.
pub fn lora_file(path: &Path) -> LoadResult<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(LoadError::MissingFile {
            path: path.to_path_buf(),
            what: "LoRA file not found".into(),
        });
    }
    let named = path.join(DIFFUSERS_LORA_FILE);
    if named.is_file() {
        return Ok(named);
    }
    let entries = std::fs::read_dir(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(LoadError::MissingFile {
            path: path.to_path_buf(),
            what: format!(
                "a folder without a LoRA: no {DIFFUSERS_LORA_FILE} nor any other .safetensors \
                 file in it"
            ),
        }),
        _ => Err(LoadError::Config {
            path: path.to_path_buf(),
            message: format!(
                "a folder of {} .safetensors files ({}) and no {DIFFUSERS_LORA_FILE}: name the \
                 LoRA's file",
                found.len(),
                found
                    .iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

impl Lora {
    pub fn open(spec: &LoraSpec) -> LoadResult<Self> {
        let path = &lora_file(&spec.path)?;
        let fail = |message: String| LoadError::Weights {
            path: path.clone(),
            message,
        };
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            fail(format!(
                "not a readable safetensors file: {e} (LoRAs are read in the safetensors format)"
            ))
        })?;
        let mut halves: BTreeMap<String, Halves> = BTreeMap::new();
        let mut unknown = Vec::new();
        for (key, t) in tensors {
            let kind = ["hada_", "lokr_", "dora_scale", "lora_mid"]
                .into_iter()
                .find(|k| key.contains(k));
            if let Some(kind) = kind {
                let what = match kind {
                    "hada_" => "a LyCORIS LoHa",
                    "lokr_" => "a LyCORIS LoKr",
                    "dora_scale" => "a DoRA",
                    _ => "a LyCORIS LoCon with a mid weight (Tucker)",
                };
                return Err(fail(format!(
                    "{what} ({key}): only plain LoRAs (down and up weights) are read"
                )));
            }
            let Some((stem, half)) = parse_key(&key) else {
                unknown.push(key);
                continue;
            };
            let entry = halves.entry(stem.to_string()).or_default();
            match half {
                Half::Down => entry.0 = Some(t),
                Half::Up => entry.1 = Some(t),
                Half::Alpha => {
                    let v = t
                        .to_dtype(DType::F64)
                        .and_then(|t| t.flatten_all())
                        .and_then(|t| t.to_vec1::<f64>())
                        .map_err(|e| fail(format!("{key}: {e}")))?;
                    match v.as_slice() {
                        [a] => entry.2 = Some(*a),
                        _ => return Err(fail(format!("{key}: an alpha is one number"))),
                    }
                }
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(fail(format!(
                "{} tensor(s) that are not a LoRA's down or up weight or alpha, such as {}: not \
                 a LoRA this server reads",
                unknown.len(),
                unknown[0]
            )));
        }
        let mut modules = BTreeMap::new();
        for (stem, (down, up, alpha)) in halves {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(fail(format!(
                    "module {stem} lacks its down or its up weight"
                )));
            };
            let (rank, up_rank) = (down.dim(0).ok(), up.dim(1).ok());
            let up_ok = matches!(up.dims(), [_, _] | [_, _, 1, 1]);
            if rank.is_none() || rank != up_rank || !up_ok || !matches!(down.rank(), 2 | 4) {
                return Err(fail(format!(
                    "module {stem}: down {:?} and up {:?} are not a LoRA's pair \
                     ([r, in] or [r, in, kh, kw], and [out, r])",
                    down.dims(),
                    up.dims()
                )));
            }
            modules.insert(stem, Module { down, up, alpha });
        }
        if modules.is_empty() {
            return Err(fail("no LoRA modules in the file".into()));
        }
        Ok(Self {
            path: path.clone(),
            scale: spec.scale,
            modules,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    /// How many of the LoRA's modules the model has taken so far.
    pub fn used_count(&self) -> usize {
        self.used.lock().map(|u| u.len()).unwrap_or(0)
    }

    /// The names a LoRA may give `part`'s module `module` (a diffusers name without
    /// `.weight`).
    fn candidates(part: Part, module: &str, layout: Option<&Layout>) -> Vec<String> {
        let underscored = |m: &str| m.replace('.', "_");
        let short = module.strip_prefix("text_model.").unwrap_or(module);
        match part {
            Part::Unet => {
                let mut names = vec![
                    format!("lora_unet_{}", underscored(module)),
                    format!("unet.{module}"),
                ];
                let sgm = layout
                    .and_then(|l| original(Part::Unet, &format!("{module}.weight"), l, ""))
                    .and_then(|r| {
                        r.source()
                            .strip_prefix(UNET_PREFIX)
                            .and_then(|n| n.strip_suffix(".weight"))
                            .map(str::to_string)
                    });
                if let Some(sgm) = sgm {
                    names.push(format!("lora_unet_{}", underscored(&sgm)));
                }
                names
            }
            Part::TextEncoder => vec![
                format!("lora_te1_{}", underscored(module)),
                format!("lora_te_{}", underscored(module)),
                format!("text_encoder.{module}"),
                format!("text_encoder.{short}"),
            ],
            Part::TextEncoder2 => vec![
                format!("lora_te2_{}", underscored(module)),
                format!("text_encoder_2.{module}"),
                format!("text_encoder_2.{short}"),
            ],
            Part::Vae => Vec::new(),
        }
    }

    /// The module (and its name in the file) that adapts `part`'s weight `name`, if any.
    fn module(
        &self,
        part: Part,
        name: &str,
        layout: Option<&Layout>,
    ) -> Option<(&String, &Module)> {
        let module = name.strip_suffix(".weight")?;
        Self::candidates(part, module, layout)
            .into_iter()
            .find_map(|c| self.modules.get_key_value(&c))
    }

    /// `scale * alpha / rank * up @ down` for the weight `name` of `part` (shape `shape`), in
    /// f32 on the CPU; `None` when this LoRA does not adapt it.
    fn delta(
        &self,
        part: Part,
        name: &str,
        shape: &[usize],
        layout: Option<&Layout>,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some((stem, m)) = self.module(part, name, layout) else {
            return Ok(None);
        };
        let rank = m.down.dim(0)?;
        let out = m.up.dim(0)?;
        let fan_in: usize = m.down.dims()[1..].iter().product();
        let fits = shape.first() == Some(&out)
            && shape[1..].iter().product::<usize>() == fan_in
            && (m.down.rank() == 2 || shape[1..] == m.down.dims()[1..]);
        if !fits {
            return Err(candle_core::Error::Msg(format!(
                "LoRA {}: module {stem} (down {:?}, up {:?}) does not fit the model's `{name}` \
                 {shape:?}: a LoRA for another model?",
                self.path.display(),
                m.down.dims(),
                m.up.dims()
            )));
        }
        let factor = self.scale * m.alpha.unwrap_or(rank as f64) / rank as f64;
        let up = m.up.to_dtype(DType::F32)?.reshape((out, rank))?;
        let down = m.down.to_dtype(DType::F32)?.reshape((rank, fan_in))?;
        let delta = (up.matmul(&down)? * factor)?.reshape(shape)?;
        if let Ok(mut used) = self.used.lock() {
            used.insert(stem.clone());
        }
        Ok(Some(delta))
    }

    /// Fails, naming them, when modules of the LoRA found no weight in the model (call it once
    /// every component is built).
    pub fn ensure_used(&self) -> LoadResult<()> {
        let used = self.used.lock().map(|u| u.clone()).unwrap_or_default();
        let unused: Vec<&String> = self.modules.keys().filter(|k| !used.contains(*k)).collect();
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = unused.iter().take(4).map(|s| s.as_str()).collect();
        Err(LoadError::Weights {
            path: self.path.clone(),
            message: format!(
                "{} of the LoRA's {} modules match no weight of the model, such as {}: a LoRA \
                 for another model (SD 1.x, say), or for layers this model does not have",
                unused.len(),
                self.modules.len(),
                shown.join(", ")
            ),
        })
    }
}

/// A component's weights with LoRAs fused in as they are read.
pub struct LoraBackend {
    inner: Box<dyn SimpleBackend>,
    /// Where the weights the LoRAs adapt are read from, when not from `inner`.
    original: Option<Box<dyn SimpleBackend>>,
    part: Part,
    loras: Vec<Arc<Lora>>,
    layout: Option<Layout>,
}

impl LoraBackend {
    pub fn wrap(
        inner: Box<dyn SimpleBackend>,
        part: Part,
        loras: &[Arc<Lora>],
        layout: Option<&Layout>,
    ) -> Box<dyn SimpleBackend> {
        Self::boxed(inner, None, part, loras, layout)
    }

    /// [`Self::wrap`], fusing into the weights as `original` reads them (the weights file's,
    /// before any rounding to the run dtype) while `inner` gives every other weight (a
    /// `--lora-modules` adapter: the model's own tensors, shared).
    pub fn wrap_reading(
        inner: Box<dyn SimpleBackend>,
        original: Box<dyn SimpleBackend>,
        part: Part,
        loras: &[Arc<Lora>],
        layout: Option<&Layout>,
    ) -> Box<dyn SimpleBackend> {
        Self::boxed(inner, Some(original), part, loras, layout)
    }

    fn boxed(
        inner: Box<dyn SimpleBackend>,
        original: Option<Box<dyn SimpleBackend>>,
        part: Part,
        loras: &[Arc<Lora>],
        layout: Option<&Layout>,
    ) -> Box<dyn SimpleBackend> {
        if loras.is_empty() {
            return inner;
        }
        Box::new(Self {
            inner,
            original,
            part,
            loras: loras.to_vec(),
            layout: layout.cloned(),
        })
    }

    /// Where a weight a LoRA adapts is read from.
    fn adapted_source(&self) -> &dyn SimpleBackend {
        self.original.as_deref().unwrap_or(self.inner.as_ref())
    }

    /// The sum of the LoRAs' deltas for `name`, if any adapts it.
    fn deltas(&self, name: &str, shape: &[usize]) -> candle_core::Result<Option<Tensor>> {
        let mut total: Option<Tensor> = None;
        for lora in &self.loras {
            if let Some(d) = lora.delta(self.part, name, shape, self.layout.as_ref())? {
                total = Some(match total {
                    Some(t) => (t + d)?,
                    None => d,
                });
            }
        }
        Ok(total)
    }

    fn fuse(
        &self,
        w: Tensor,
        delta: Tensor,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        (w.to_dtype(DType::F32)? + delta.to_device(dev)?)?.to_dtype(dtype)
    }
}

impl SimpleBackend for LoraBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.deltas(name, s.dims())? {
            None => self.inner.get(s, name, init, dtype, dev),
            Some(delta) => {
                let w = self.adapted_source().get(s, name, init, DType::F32, dev)?;
                self.fuse(w, delta, dtype, dev)
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let layout = self.layout.as_ref();
        let adapted = self
            .loras
            .iter()
            .any(|l| l.module(self.part, name, layout).is_some());
        if !adapted {
            return self.inner.get_unchecked(name, dtype, dev);
        }
        let w = self.adapted_source().get_unchecked(name, DType::F32, dev)?;
        match self.deltas(name, w.dims())? {
            None => w.to_dtype(dtype),
            Some(delta) => self.fuse(w, delta, dtype, dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lora_is_a_file_and_an_optional_scale() {
        let spec = |s: &str| LoraSpec::parse(s).unwrap();
        assert_eq!(spec("a.safetensors").scale, 1.0);
        let s = spec("dir/a.safetensors:0.6");
        assert_eq!(
            (s.path.to_str().unwrap(), s.scale),
            ("dir/a.safetensors", 0.6)
        );
        assert_eq!(spec("a.safetensors:-1").scale, -1.0);
        // A `:` that is not followed by a number is part of the path.
        assert_eq!(
            spec("C:/loras/a.safetensors").path,
            Path::new("C:/loras/a.safetensors")
        );
        assert!(LoraSpec::parse("a.safetensors:inf").is_err());
        assert!(LoraSpec::parse("").is_err());
    }

    #[test]
    fn an_adapter_is_a_name_and_a_lora() {
        let a = AdapterSpec::parse("pixel-art=loras/pixel.safetensors:0.7").unwrap();
        assert_eq!(a.name, "pixel-art");
        assert_eq!(
            a.loras,
            [LoraSpec {
                path: "loras/pixel.safetensors".into(),
                scale: 0.7
            }]
        );
        // An `=` in the path is the path's.
        let a = AdapterSpec::parse("x=dir/a=b.safetensors").unwrap();
        assert_eq!((a.name.as_str(), a.loras[0].scale), ("x", 1.0));
        assert_eq!(a.loras[0].path, Path::new("dir/a=b.safetensors"));
        for bad in [
            "pixel.safetensors",
            "=a.safetensors",
            "my style=a.safetensors",
            "x=",
        ] {
            let e = AdapterSpec::parse(bad).unwrap_err();
            assert!(e.contains("--lora-modules"), "{bad}: {e}");
        }
        assert!(AdapterSpec::parse("gpt-*=a.safetensors").is_err());
        // One name given twice stacks; the order of first appearance is kept.
        let specs: Vec<AdapterSpec> = ["b=1.safetensors", "a=2.safetensors", "b=3.safetensors:0.5"]
            .iter()
            .map(|s| AdapterSpec::parse(s).unwrap())
            .collect();
        let merged = AdapterSpec::merged(&specs);
        let names: Vec<&str> = merged.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(merged[0].loras.len(), 2);
        assert_eq!(merged[0].loras[1].scale, 0.5);
    }

    #[test]
    fn a_modules_names_in_either_layout() {
        let layout = Layout {
            unet_layers_per_block: 2,
            unet_up_attention: vec![true, true, false],
            vae_up_blocks: 4,
        };
        let unet = Lora::candidates(
            Part::Unet,
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            Some(&layout),
        );
        assert!(unet.contains(&"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q".into()));
        assert!(unet.contains(
            &"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q".into()
        ));
        assert!(unet
            .contains(&"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q".into()));
        let te = Lora::candidates(
            Part::TextEncoder2,
            "text_model.encoder.layers.0.mlp.fc1",
            None,
        );
        assert!(te.contains(&"lora_te2_text_model_encoder_layers_0_mlp_fc1".into()));
        assert!(te.contains(&"text_encoder_2.encoder.layers.0.mlp.fc1".into()));
        assert!(Lora::candidates(Part::Vae, "decoder.conv_in", None).is_empty());
    }
}
