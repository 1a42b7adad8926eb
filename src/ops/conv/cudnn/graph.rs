//! One convolution through cuDNN's graph (backend) API: the candidates the `conv-graph` lever
//! weighs beside the legacy algorithms (see [`super`]).
//!
//! The legacy call (`cudnnConvolutionForward` with an algorithm enum) reaches the engines cuDNN
//! maps to those enums; the graph API is what PyTorch's convolutions call, and it lists engines by
//! its own heuristic. Which of the two runs a shape faster on a given GPU is measured, never
//! assumed: this module only builds and runs graph plans; the caller checks each one's output
//! against the legacy algorithm's and times both.
//!
//! The graph is a single convolution-forward operation with `alpha = 1, beta = 1` (the caller
//! prefills `y` with `bias (+ residual)`, the legacy path's `Prefill` epilogue), on the same
//! logical NCHW dims as the legacy descriptors with strides for NCHW or NHWC (filters KRSC).
//! Engine configurations come from heuristic mode A, best first (its fallback list when none of
//! mode A's passes); engines that compile at run time (NVRTC, seconds per plan), that are
//! non-deterministic, that down-convert inputs or that sum in reduced precision are passed
//! over, as are plans whose workspace exceeds the cap.
//!
//! Every tensor is declared [`ALIGNMENT`]-byte aligned (what the fast kernels want); the caller
//! runs a plan only on pointers that are (`super::super::aligned`) and otherwise uses its legacy
//! choice.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::{bail, DType, Result};

use super::super::{backend_strides as strides, ConvParams, Geometry};

pub(super) use super::super::GRAPH_ALIGNMENT as ALIGNMENT;

const UID_X: i64 = 1;
const UID_W: i64 = 2;
const UID_Y: i64 = 3;

use sys::cudnnBackendAttributeName_t as A;
use sys::cudnnBackendAttributeType_t as T;
use sys::cudnnBackendDescriptorType_t as D;

/// A backend descriptor, destroyed on drop.
struct Desc(sys::cudnnBackendDescriptor_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnBackendCreateDescriptor and destroyed only here.
        let _ = unsafe { sys::cudnnBackendDestroyDescriptor(self.0) };
    }
}

/// `Ok` on success; the error names the call (`what` is formatted only then: `execute` runs on
/// every convolution).
fn check(status: sys::cudnnStatus_t, what: impl FnOnce() -> String) -> Result<()> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        bail!("conv2d graph: {}: {status:?}", what())
    }
}

impl Desc {
    fn new(kind: sys::cudnnBackendDescriptorType_t) -> Result<Self> {
        let mut d: sys::cudnnBackendDescriptor_t = std::ptr::null_mut();
        // SAFETY: valid out pointer.
        check(
            unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut d) },
            || format!("create {kind:?}"),
        )?;
        Ok(Self(d))
    }

    /// Sets `name` to `values` (of the C type `ty` stands for).
    fn set<V>(&self, name: sys::cudnnBackendAttributeName_t, ty: T, values: &[V]) -> Result<()> {
        // SAFETY: live descriptor; `values` holds `len` elements of the type `ty` names (the
        // callers pass i64 for INT64, f32 for FLOAT, the sys enums for enum types, descriptor
        // handles for BACKEND_DESCRIPTOR, pointers for VOID_PTR).
        check(
            unsafe {
                sys::cudnnBackendSetAttribute(
                    self.0,
                    name,
                    ty,
                    values.len() as i64,
                    values.as_ptr().cast::<c_void>(),
                )
            },
            || format!("set {name:?}"),
        )
    }

    fn set_desc(&self, name: sys::cudnnBackendAttributeName_t, d: &Desc) -> Result<()> {
        self.set(name, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &[d.0])
    }

    fn finalize(&self, what: &str) -> Result<()> {
        // SAFETY: live descriptor.
        check(unsafe { sys::cudnnBackendFinalize(self.0) }, || {
            format!("finalize {what}")
        })
    }

    /// Reads up to `out.len()` elements of `name`; returns how many there are.
    fn get<V>(
        &self,
        name: sys::cudnnBackendAttributeName_t,
        ty: T,
        out: &mut [V],
    ) -> Result<usize> {
        let mut n = 0i64;
        // SAFETY: live descriptor; `out` has room for `out.len()` elements of `ty`'s C type.
        check(
            unsafe {
                sys::cudnnBackendGetAttribute(
                    self.0,
                    name,
                    ty,
                    out.len() as i64,
                    &mut n,
                    // An empty request asks for the count alone: cuDNN is given no array then.
                    if out.is_empty() {
                        std::ptr::null_mut()
                    } else {
                        out.as_mut_ptr().cast::<c_void>()
                    },
                )
            },
            || format!("get {name:?}"),
        )?;
        Ok(n.max(0) as usize)
    }
}

fn tensor(uid: i64, dt: sys::cudnnDataType_t, dims: [i64; 4], channels_last: bool) -> Result<Desc> {
    let t = Desc::new(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
    t.set(
        A::CUDNN_ATTR_TENSOR_DATA_TYPE,
        T::CUDNN_TYPE_DATA_TYPE,
        &[dt],
    )?;
    t.set(A::CUDNN_ATTR_TENSOR_DIMENSIONS, T::CUDNN_TYPE_INT64, &dims)?;
    t.set(
        A::CUDNN_ATTR_TENSOR_STRIDES,
        T::CUDNN_TYPE_INT64,
        &strides(dims, channels_last),
    )?;
    t.set(A::CUDNN_ATTR_TENSOR_UNIQUE_ID, T::CUDNN_TYPE_INT64, &[uid])?;
    t.set(
        A::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
        T::CUDNN_TYPE_INT64,
        &[ALIGNMENT as i64],
    )?;
    t.finalize("tensor")?;
    Ok(t)
}

/// A finalized execution plan and every descriptor it was built from (kept alive with it).
pub(super) struct GraphPlan {
    plan: Desc,
    /// The last call's variant pack and the pointers it holds (x, w, y, workspace): the
    /// stream-ordered pool tends to hand a shape the same addresses batch after batch, and a
    /// pack is six cuDNN calls to build.
    last_pack: std::cell::RefCell<Option<([u64; 4], Desc)>>,
    _cfg: Desc,
    _graph: std::rc::Rc<Vec<Desc>>,
    /// Workspace bytes the plan needs.
    pub(super) workspace: usize,
    /// The engine's global index and its rank in the heuristic's list, for plan summaries.
    pub(super) name: String,
}

/// Up to `max` finalized plans for the convolution, the heuristic's best first, and a note on
/// the engines passed over. `Err` when the operation graph itself cannot be built (cuDNN too old,
/// or the shape unsupported by the graph API).
pub(super) fn candidates(
    handle: sys::cudnnHandle_t,
    dtype: DType,
    g: &Geometry,
    p: &ConvParams,
    max: usize,
    max_workspace: usize,
) -> Result<(Vec<GraphPlan>, String)> {
    let dt = match dtype {
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        // f32 stays on the legacy path, whose FMA math keeps it f32 (graph engines may run TF32).
        other => bail!("conv2d graph: only f16/bf16 ({other:?})"),
    };
    let i = |v: usize| v as i64;
    let cl = p.channels_last;
    let x = tensor(UID_X, dt, [i(g.n), i(g.c), i(g.h), i(g.w)], cl)?;
    let w = tensor(UID_W, dt, [i(g.o), i(g.c), i(g.kh), i(g.kw)], cl)?;
    let y = tensor(UID_Y, dt, [i(g.n), i(g.o), i(g.oh), i(g.ow)], cl)?;

    let conv = Desc::new(D::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
    let f32_t = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
    conv.set(
        A::CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
        T::CUDNN_TYPE_DATA_TYPE,
        &[f32_t],
    )?;
    conv.set(
        A::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
        T::CUDNN_TYPE_CONVOLUTION_MODE,
        &[sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION],
    )?;
    conv.set(
        A::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS,
        T::CUDNN_TYPE_INT64,
        &[2i64],
    )?;
    let (pad, stride) = (i(p.padding), i(p.stride));
    conv.set(
        A::CUDNN_ATTR_CONVOLUTION_DILATIONS,
        T::CUDNN_TYPE_INT64,
        &[1i64, 1],
    )?;
    conv.set(
        A::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
        T::CUDNN_TYPE_INT64,
        &[stride, stride],
    )?;
    conv.set(
        A::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS,
        T::CUDNN_TYPE_INT64,
        &[pad, pad],
    )?;
    conv.set(
        A::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS,
        T::CUDNN_TYPE_INT64,
        &[pad, pad],
    )?;
    conv.finalize("convolution")?;

    let op = Desc::new(D::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR)?;
    op.set_desc(A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, &x)?;
    op.set_desc(A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, &w)?;
    op.set_desc(A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, &y)?;
    op.set_desc(A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC, &conv)?;
    // Scaling factors are f32 for f16/bf16 data. beta = 1: y += conv(x, w) onto the prefill.
    op.set(
        A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
        T::CUDNN_TYPE_FLOAT,
        &[1f32],
    )?;
    op.set(
        A::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
        T::CUDNN_TYPE_FLOAT,
        &[1f32],
    )?;
    op.finalize("convolution forward operation")?;

    let graph = Desc::new(D::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
    graph.set(
        A::CUDNN_ATTR_OPERATIONGRAPH_OPS,
        T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
        &[op.0],
    )?;
    graph.set(
        A::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
        T::CUDNN_TYPE_HANDLE,
        &[handle],
    )?;
    graph.finalize("operation graph")?;

    let keep = std::rc::Rc::new(vec![x, w, y, conv, op, graph]);
    let op_graph = keep
        .last()
        .expect("the graph was pushed last (this is a bug)");
    let mut plans = Vec::new();
    let mut skipped = Vec::new();
    let mut listed = Vec::new();
    // Mode A's list first; cuDNN's fallback list (as PyTorch asks for) only when nothing in it
    // passed. Every listed engine is looked at until `max` plans are finalized: the notes are
    // read on the host, and the heuristic may rank engines that are passed over first.
    for (mode, name) in [
        (sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A, "mode A"),
        (
            sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK,
            "fallback",
        ),
    ] {
        if !plans.is_empty() {
            break;
        }
        let cfgs = match heuristic(op_graph, mode) {
            Ok(cfgs) => cfgs,
            Err(e) => {
                listed.push(format!("{name}: {e}"));
                continue;
            }
        };
        listed.push(format!("{name} listed {}", cfgs.len()));
        for (rank, cfg) in cfgs.into_iter().enumerate() {
            if plans.len() >= max {
                break;
            }
            match plan_for(handle, name, rank, cfg, &keep, max_workspace) {
                Ok(Ok(plan)) => plans.push(plan),
                Ok(Err(why)) => skipped.push(format!("{name} #{rank} {why}")),
                Err(e) => skipped.push(format!("{name} #{rank} {e}")),
            }
        }
    }
    let listed = listed.join(", ");
    let note = format!(
        "heuristic {listed}; {}",
        if skipped.is_empty() {
            "none passed over".to_string()
        } else {
            format!("passed over: {}", skipped.join(", "))
        }
    );
    Ok((plans, note))
}

/// The engine configurations cuDNN's heuristic lists for `graph` in `mode`, best first.
fn heuristic(graph: &Desc, mode: sys::cudnnBackendHeurMode_t) -> Result<Vec<Desc>> {
    let heur = Desc::new(D::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
    heur.set_desc(A::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph)?;
    heur.set(
        A::CUDNN_ATTR_ENGINEHEUR_MODE,
        T::CUDNN_TYPE_HEUR_MODE,
        &[mode],
    )?;
    heur.finalize("engine heuristic")?;
    let listed = heur.get::<sys::cudnnBackendDescriptor_t>(
        A::CUDNN_ATTR_ENGINEHEUR_RESULTS,
        T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
        &mut [],
    )?;
    let cfgs = (0..listed)
        .map(|_| Desc::new(D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
        .collect::<Result<Vec<_>>>()?;
    let mut raw: Vec<sys::cudnnBackendDescriptor_t> = cfgs.iter().map(|d| d.0).collect();
    let got = heur.get(
        A::CUDNN_ATTR_ENGINEHEUR_RESULTS,
        T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
        &mut raw,
    )?;
    Ok(cfgs.into_iter().take(got).collect())
}

/// An engine's behavior or numerical notes, as plain integers (a newer cuDNN may know values
/// this build's enums do not), asking for `kinds` of them: the count of kinds in this build's
/// header, as cudnn-frontend does.
fn notes(
    engine: &Desc,
    name: sys::cudnnBackendAttributeName_t,
    ty: T,
    kinds: u32,
) -> Result<Vec<u32>> {
    let mut out = vec![0u32; kinds as usize];
    let n = engine.get(name, ty, &mut out)?;
    out.truncate(n);
    Ok(out)
}

/// The plan of one engine configuration, or why it is passed over (`Ok(Err(..))`).
fn plan_for(
    handle: sys::cudnnHandle_t,
    list: &str,
    rank: usize,
    cfg: Desc,
    keep: &std::rc::Rc<Vec<Desc>>,
    max_workspace: usize,
) -> Result<std::result::Result<GraphPlan, String>> {
    let engine = Desc::new(D::CUDNN_BACKEND_ENGINE_DESCRIPTOR)?;
    cfg.get(
        A::CUDNN_ATTR_ENGINECFG_ENGINE,
        T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
        &mut [engine.0],
    )?;
    let mut index = [0i64];
    engine.get(
        A::CUDNN_ATTR_ENGINE_GLOBAL_INDEX,
        T::CUDNN_TYPE_INT64,
        &mut index,
    )?;
    let engine_name = format!("engine {}", index[0]);
    let behavior = notes(
        &engine,
        A::CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE,
        T::CUDNN_TYPE_BEHAVIOR_NOTE,
        sys::cudnnBackendBehaviorNote_t::CUDNN_BEHAVIOR_NOTE_TYPE_COUNT as u32,
    )?;
    let runtime_compiled =
        sys::cudnnBackendBehaviorNote_t::CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION as u32;
    if behavior.contains(&runtime_compiled) {
        return Ok(Err(format!("{engine_name}: compiles at run time")));
    }
    let numerical = notes(
        &engine,
        A::CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
        T::CUDNN_TYPE_NUMERICAL_NOTE,
        sys::cudnnBackendNumericalNote_t::CUDNN_NUMERICAL_NOTE_TYPE_COUNT as u32,
    )?;
    use sys::cudnnBackendNumericalNote_t as N;
    for (note, why) in [
        (
            N::CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC,
            "non-deterministic",
        ),
        (
            N::CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS,
            "down-converts inputs",
        ),
        // Sums in half precision: the promise is f32 accumulation and one rounding, and the
        // output check's bound is too loose to catch a small systematic drift.
        (
            N::CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION,
            "reduced-precision reduction",
        ),
    ] {
        if numerical.contains(&(note as u32)) {
            return Ok(Err(format!("{engine_name}: {why}")));
        }
    }
    let plan = Desc::new(D::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
    plan.set(
        A::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
        T::CUDNN_TYPE_HANDLE,
        &[handle],
    )?;
    plan.set_desc(A::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &cfg)?;
    if let Err(e) = plan.finalize("execution plan") {
        return Ok(Err(format!("{engine_name}: {e}")));
    }
    let mut ws = [0i64];
    plan.get(
        A::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
        T::CUDNN_TYPE_INT64,
        &mut ws,
    )?;
    let workspace = ws[0].max(0) as usize;
    if workspace > max_workspace {
        return Ok(Err(format!(
            "{engine_name}: workspace {} MiB over the cap",
            workspace >> 20
        )));
    }
    Ok(Ok(GraphPlan {
        plan,
        last_pack: std::cell::RefCell::new(None),
        _cfg: cfg,
        _graph: keep.clone(),
        workspace,
        name: format!("{engine_name} ({list} #{rank})"),
    }))
}

/// Enqueues `plan` on the handle's stream: `y += conv(x, w)`.
///
/// # Safety
/// `x`, `w` and `y` must be live device buffers of the sizes the plan's geometry gives, aligned
/// ([`ALIGNMENT`]), and `workspace` (when the plan needs one) at least `plan.workspace` bytes, all
/// kept alive until the work is done (stream order).
pub(super) unsafe fn execute(
    handle: sys::cudnnHandle_t,
    plan: &GraphPlan,
    x: u64,
    w: u64,
    y: u64,
    workspace: *mut c_void,
) -> Result<()> {
    let key = [x, w, y, workspace as u64];
    let mut last = plan.last_pack.borrow_mut();
    if !matches!(&*last, Some((k, _)) if *k == key) {
        *last = Some((key, variant_pack(x, w, y, workspace)?));
    }
    let Some((_, pack)) = &*last else {
        bail!("conv2d graph: no variant pack (this is a bug)")
    };
    // SAFETY: live handle, finalized plan and pack; the pointers per this function's contract.
    check(
        unsafe { sys::cudnnBackendExecute(handle, plan.plan.0, pack.0) },
        || "execute".to_string(),
    )
}

/// A finalized variant pack binding x, w, y and the workspace to the plan's tensors.
fn variant_pack(x: u64, w: u64, y: u64, workspace: *mut c_void) -> Result<Desc> {
    let pack = Desc::new(D::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
    pack.set(
        A::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
        T::CUDNN_TYPE_INT64,
        &[UID_X, UID_W, UID_Y],
    )?;
    let ptrs = [x, w, y].map(|p| p as *mut c_void);
    pack.set(
        A::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
        T::CUDNN_TYPE_VOID_PTR,
        &ptrs,
    )?;
    pack.set(
        A::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
        T::CUDNN_TYPE_VOID_PTR,
        &[workspace],
    )?;
    pack.finalize("variant pack")?;
    Ok(pack)
}
