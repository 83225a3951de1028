//! The two networks of DiReDi: the cloud "teacher" and the edge "student".
//!
//! Where it stands: [`crate::train`] fits a [`Net`] on standardised `[N, C, T]` windows, the
//! teacher's logits feed the distillation loss in [`crate::kd`], and [`crate::onnx`] turns a
//! trained student into the ONNX graph the gateways run.
//!
//! Both are 1-D CNNs described by a [`ModelConfig`]: a stack of conv blocks
//! (zero padding → conv → optional batch norm → ReLU), global average pooling over time,
//! hidden fully connected layers with ReLU and dropout, and a linear head giving `[N, K]`
//! logits. The config is serialised beside every checkpoint, so a checkpoint is
//! self-describing. Nothing here depends on a particular dataset: channels, window length and
//! classes come from the config.
//!
//! Padding is "same" style (output length `ceil(L / stride)`), possibly one sample larger on
//! the right; ONNX expresses it with asymmetric `pads`. Inside the network activations are
//! channels-last `[N, L, C]` and every conv is an explicit im2col (a gather of the kernel taps)
//! followed by one matrix product, because candle 0.11's CPU `conv1d` backward returns wrong
//! kernel gradients (it multiplies by the strided kernel instead of its contiguous copy); this
//! path is exact and trains about as fast. `gradients_match_finite_differences` guards it.
//!
//! Initialisation is deterministic: every parameter is drawn from a [`ChaCha8Rng`] seeded by
//! the caller, in sorted parameter-name order (candle's own CPU RNG cannot be seeded reliably).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Format tag written into checkpoint sidecars.
pub const CHECKPOINT_FORMAT: &str = "diredi-checkpoint/1";

const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// Errors of model construction and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The configuration describes no valid network.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a checkpoint file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A checkpoint sidecar is not the JSON expected.
    #[error("{path}: not a {CHECKPOINT_FORMAT} sidecar: {source}")]
    Sidecar {
        /// The sidecar file.
        path: PathBuf,
        /// What the JSON parser said.
        source: serde_json::Error,
    },
    /// The weights file does not match the network described by its sidecar.
    #[error("{path}: {detail}")]
    Checkpoint {
        /// The weights file.
        path: PathBuf,
        /// Which tensor is missing, extra or of the wrong shape.
        detail: String,
    },
}

/// The role of a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// The large cloud model, trained on the manufacturer's presumed data.
    Teacher,
    /// The small edge model, distilled from the teacher and exported to ONNX.
    Student,
}

/// One convolution block: zero pad → conv → (batch norm) → ReLU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvSpec {
    /// Output channels.
    pub out: usize,
    /// Kernel size in samples.
    pub kernel: usize,
    /// Stride in samples.
    pub stride: usize,
}

impl ConvSpec {
    /// Conv block with `out` channels, kernel `kernel`, stride `stride`.
    pub const fn new(out: usize, kernel: usize, stride: usize) -> Self {
        Self {
            out,
            kernel,
            stride,
        }
    }

    /// Output length and `(left, right)` zero padding for an input of `len` samples.
    pub fn geometry(&self, len: usize) -> (usize, usize, usize) {
        let out = len.div_ceil(self.stride);
        let total = ((out - 1) * self.stride + self.kernel).saturating_sub(len);
        let left = total / 2;
        (out, left, total - left)
    }
}

/// Everything needed to rebuild a network; stored beside each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Teacher or student.
    pub arch: Arch,
    /// Channels `C` of an input window.
    pub in_channels: usize,
    /// Samples `T` of an input window.
    pub window: usize,
    /// Classes `K` of the output.
    pub num_classes: usize,
    /// Convolution blocks, input side first.
    pub convs: Vec<ConvSpec>,
    /// Widths of the hidden fully connected layers between pooling and the head.
    #[serde(default)]
    pub hidden: Vec<usize>,
    /// Batch norm after every convolution (folded into the conv at ONNX export).
    #[serde(default)]
    pub batch_norm: bool,
    /// Dropout probability on the input of every fully connected layer, in training only.
    #[serde(default)]
    pub dropout: f32,
}

impl ModelConfig {
    /// The default teacher: five conv blocks (48 → 256 channels, overall stride 8), batch norm,
    /// one hidden layer of 128, dropout 0.3. About 0.32 M parameters for 6 channels.
    pub fn teacher(in_channels: usize, window: usize, num_classes: usize) -> Self {
        Self {
            arch: Arch::Teacher,
            in_channels,
            window,
            num_classes,
            convs: vec![
                ConvSpec::new(48, 5, 1),
                ConvSpec::new(96, 5, 2),
                ConvSpec::new(128, 3, 2),
                ConvSpec::new(192, 3, 2),
                ConvSpec::new(256, 3, 1),
            ],
            hidden: vec![128],
            batch_norm: true,
            dropout: 0.3,
        }
    }

    /// The default student: three conv blocks (32, 64, 64 channels, overall stride 4), batch
    /// norm, a linear head on the pooled features. About 32 k parameters for 6 channels.
    pub fn student(in_channels: usize, window: usize, num_classes: usize) -> Self {
        Self {
            arch: Arch::Student,
            in_channels,
            window,
            num_classes,
            convs: vec![
                ConvSpec::new(32, 5, 1),
                ConvSpec::new(64, 5, 2),
                ConvSpec::new(64, 5, 2),
            ],
            hidden: Vec::new(),
            batch_norm: true,
            dropout: 0.1,
        }
    }

    /// Checks every dimension; lists all problems at once.
    pub fn validate(&self) -> Result<(), ModelError> {
        let mut problems = Vec::new();
        if self.in_channels == 0 {
            problems.push("in_channels must be at least 1, found 0".to_owned());
        }
        if self.window == 0 {
            problems.push("window must be at least 1 sample, found 0".to_owned());
        }
        if self.num_classes < 2 {
            problems.push(format!(
                "num_classes must be at least 2, found {}",
                self.num_classes
            ));
        }
        if self.convs.is_empty() {
            problems.push("at least one conv block is needed, found none".to_owned());
        }
        for (i, c) in self.convs.iter().enumerate() {
            if c.out == 0 || c.kernel == 0 || c.stride == 0 {
                problems.push(format!(
                    "conv {i}: out, kernel and stride must be at least 1, found {c:?}"
                ));
            } else if c.kernel < c.stride {
                problems.push(format!(
                    "conv {i}: kernel {} smaller than stride {} would skip samples",
                    c.kernel, c.stride
                ));
            }
        }
        if let Some(i) = self.hidden.iter().position(|&h| h == 0) {
            problems.push(format!("hidden layer {i} has width 0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            problems.push(format!("dropout must be in [0, 1), found {}", self.dropout));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Config(problems.join("; ")))
        }
    }

    /// Input length of every conv block and the length after the last one.
    pub fn lengths(&self) -> Vec<usize> {
        let mut lens = vec![self.window];
        for c in &self.convs {
            let (out, _, _) = c.geometry(*lens.last().unwrap_or(&self.window));
            lens.push(out);
        }
        lens
    }

    /// Features entering the first fully connected layer.
    pub fn pooled_features(&self) -> usize {
        self.convs.last().map_or(self.in_channels, |c| c.out)
    }

    /// Number of trainable parameters (batch-norm running statistics excluded).
    pub fn param_count(&self) -> usize {
        param_specs(self)
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    /// Uniform in ±sqrt(6 / fan_in) (He/Kaiming uniform, for layers followed by ReLU).
    HeUniform {
        fan_in: usize,
    },
    /// Uniform in ±1 / sqrt(fan_in) (PyTorch's default, for the head).
    LecunUniform {
        fan_in: usize,
    },
    Const(f32),
}

#[derive(Debug, Clone)]
struct ParamSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
    trainable: bool,
    decay: bool,
}

fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let p = |name: String, shape: Vec<usize>, init, trainable, decay| ParamSpec {
        name,
        shape,
        init,
        trainable,
        decay,
    };
    let mut specs = Vec::new();
    let mut cin = cfg.in_channels;
    for (i, c) in cfg.convs.iter().enumerate() {
        let fan_in = cin * c.kernel;
        specs.push(p(
            format!("conv{i}.weight"),
            vec![c.out, cin, c.kernel],
            Init::HeUniform { fan_in },
            true,
            true,
        ));
        if cfg.batch_norm {
            let bn = |what: &str, init, trainable| {
                p(format!("bn{i}.{what}"), vec![c.out], init, trainable, false)
            };
            specs.push(bn("weight", Init::Const(1.0), true));
            specs.push(bn("bias", Init::Const(0.0), true));
            specs.push(bn("running_mean", Init::Const(0.0), false));
            specs.push(bn("running_var", Init::Const(1.0), false));
        } else {
            specs.push(p(
                format!("conv{i}.bias"),
                vec![c.out],
                Init::Const(0.0),
                true,
                false,
            ));
        }
        cin = c.out;
    }
    let mut fin = cfg.pooled_features();
    for (j, &h) in cfg.hidden.iter().enumerate() {
        specs.push(p(
            format!("fc{j}.weight"),
            vec![h, fin],
            Init::HeUniform { fan_in: fin },
            true,
            true,
        ));
        specs.push(p(
            format!("fc{j}.bias"),
            vec![h],
            Init::Const(0.0),
            true,
            false,
        ));
        fin = h;
    }
    specs.push(p(
        "head.weight".to_owned(),
        vec![cfg.num_classes, fin],
        Init::LecunUniform { fan_in: fin },
        true,
        true,
    ));
    specs.push(p(
        "head.bias".to_owned(),
        vec![cfg.num_classes],
        Init::Const(0.0),
        true,
        false,
    ));
    specs
}

fn draw(init: Init, count: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let uniform = |bound: f32, rng: &mut ChaCha8Rng| -> Vec<f32> {
        (0..count).map(|_| rng.gen_range(-bound..=bound)).collect()
    };
    match init {
        Init::HeUniform { fan_in } => uniform((6.0 / fan_in.max(1) as f32).sqrt(), rng),
        Init::LecunUniform { fan_in } => uniform(1.0 / (fan_in.max(1) as f32).sqrt(), rng),
        Init::Const(v) => vec![v; count],
    }
}

/// A convolution block as built from the variables.
#[derive(Debug)]
struct ConvBlock {
    spec: ConvSpec,
    pad: (usize, usize),
    out_len: usize,
    /// Time index of every (output step, tap) pair: `idx[o·k + j] = o·stride + j`.
    taps: Tensor,
    weight: Tensor,
    bias: Option<Tensor>,
    bn: Option<BatchNormLayer>,
}

impl ConvBlock {
    /// Convolution of a channels-last batch `[N, L, C]` → `[N·L_out, out]`, as an explicit
    /// im2col (gather of the taps) and one matrix product, both with exact gradients.
    fn conv(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, _, c) = x.dims3()?;
        let k = self.spec.kernel;
        let padded = x.pad_with_zeros(1, self.pad.0, self.pad.1)?;
        let cols = padded
            .index_select(&self.taps, 1)?
            .reshape((n * self.out_len, k * c))?;
        // [out, C, k] → [k, C, out] → [k·C, out], matching the column order j·C + c.
        let w = self
            .weight
            .permute((2, 1, 0))?
            .contiguous()?
            .reshape((k * c, self.spec.out))?;
        let h = cols.matmul(&w)?;
        match &self.bias {
            Some(b) => h.broadcast_add(b),
            None => Ok(h),
        }
    }
}

/// Batch norm over the rows of `[rows, features]` (rows = batch × time).
#[derive(Debug)]
struct BatchNormLayer {
    gamma: Tensor,
    beta: Tensor,
    running_mean: Var,
    running_var: Var,
}

impl BatchNormLayer {
    fn forward(&self, h: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let normalised = if train {
            let rows = h.dim(0)?;
            let mean = h.mean_keepdim(0)?;
            let centred = h.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean_keepdim(0)?;
            let unbiased = rows as f64 / (rows.max(2) - 1) as f64;
            let m = BN_MOMENTUM;
            let new_mean =
                ((self.running_mean.as_tensor() * (1.0 - m))? + (mean.detach().squeeze(0)? * m)?)?;
            let new_var = ((self.running_var.as_tensor() * (1.0 - m))?
                + (var.detach().squeeze(0)? * (m * unbiased))?)?;
            self.running_mean.set(&new_mean)?;
            self.running_var.set(&new_var)?;
            centred.broadcast_div(&(var + BN_EPS)?.sqrt()?)?
        } else {
            let mean = self.running_mean.as_detached_tensor();
            let std = (self.running_var.as_detached_tensor() + BN_EPS)?.sqrt()?;
            h.broadcast_sub(&mean)?.broadcast_div(&std)?
        };
        normalised
            .broadcast_mul(&self.gamma)?
            .broadcast_add(&self.beta)
    }
}

#[derive(Debug)]
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// The plain weights of one conv block with batch norm folded in, for export.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedConv {
    /// Kernel size, stride and output channels.
    pub spec: ConvSpec,
    /// Input channels.
    pub in_channels: usize,
    /// Zero padding `(left, right)` in samples.
    pub pad: (usize, usize),
    /// `[out, in, kernel]`, row-major.
    pub weight: Vec<f32>,
    /// `[out]`.
    pub bias: Vec<f32>,
}

/// The plain weights of one fully connected layer, for export.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedDense {
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// `[out, inp]`, row-major.
    pub weight: Vec<f32>,
    /// `[out]`.
    pub bias: Vec<f32>,
}

/// A network in inference form: batch norm folded into the convs, dropout gone.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldedNet {
    /// Conv blocks, each followed by ReLU.
    pub convs: Vec<FoldedConv>,
    /// Hidden fully connected layers, each followed by ReLU.
    pub hidden: Vec<FoldedDense>,
    /// The linear head giving logits.
    pub head: FoldedDense,
}

/// A teacher or student network with its variables.
pub struct Net {
    config: ModelConfig,
    varmap: VarMap,
    convs: Vec<ConvBlock>,
    hidden: Vec<Dense>,
    head: Dense,
    dropout_rng: Mutex<ChaCha8Rng>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("config", &self.config)
            .field("params", &self.param_count())
            .finish_non_exhaustive()
    }
}

impl Net {
    /// Builds a network with weights drawn from a [`ChaCha8Rng`] seeded with `seed`.
    pub fn new(config: ModelConfig, seed: u64) -> Result<Self, ModelError> {
        config.validate()?;
        let mut specs = param_specs(&config);
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut values = HashMap::new();
        for s in &specs {
            let count = s.shape.iter().product();
            let data = draw(s.init, count, &mut rng);
            values.insert(
                s.name.clone(),
                Tensor::from_vec(data, s.shape.as_slice(), &Device::Cpu)?,
            );
        }
        Self::from_tensors(config, values, seed)
    }

    fn from_tensors(
        config: ModelConfig,
        mut values: HashMap<String, Tensor>,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let varmap = VarMap::new();
        let mut take = |name: &str| -> Result<Tensor, ModelError> {
            let t = values
                .remove(name)
                .ok_or_else(|| ModelError::Config(format!("parameter `{name}` missing")))?;
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?;
            let tensor = var.as_tensor().clone();
            varmap
                .data()
                .lock()
                .map_err(|_| ModelError::Config("variable map lock poisoned".to_owned()))?
                .insert(name.to_owned(), var);
            Ok(tensor)
        };
        let lens = config.lengths();
        let mut convs = Vec::with_capacity(config.convs.len());
        for (i, spec) in config.convs.iter().enumerate() {
            let (_, left, right) = spec.geometry(lens[i]);
            let weight = take(&format!("conv{i}.weight"))?;
            let (bias, bn) = if config.batch_norm {
                let w = take(&format!("bn{i}.weight"))?;
                let b = take(&format!("bn{i}.bias"))?;
                let mean = take(&format!("bn{i}.running_mean"))?;
                let var = take(&format!("bn{i}.running_var"))?;
                let bn = BatchNormLayer {
                    gamma: w,
                    beta: b,
                    running_mean: Var::from_tensor(&mean)?,
                    running_var: Var::from_tensor(&var)?,
                };
                (None, Some(bn))
            } else {
                (Some(take(&format!("conv{i}.bias"))?), None)
            };
            let out_len = lens[i + 1];
            let taps: Vec<u32> = (0..out_len)
                .flat_map(|o| (0..spec.kernel).map(move |j| (o * spec.stride + j) as u32))
                .collect();
            convs.push(ConvBlock {
                spec: *spec,
                pad: (left, right),
                out_len,
                taps: Tensor::from_vec(taps, out_len * spec.kernel, &Device::Cpu)?,
                weight,
                bias,
                bn,
            });
        }
        let mut hidden = Vec::with_capacity(config.hidden.len());
        for j in 0..config.hidden.len() {
            hidden.push(Dense {
                weight: take(&format!("fc{j}.weight"))?,
                bias: take(&format!("fc{j}.bias"))?,
            });
        }
        let head = Dense {
            weight: take("head.weight")?,
            bias: take("head.bias")?,
        };
        Ok(Self {
            config,
            varmap,
            convs,
            hidden,
            head,
            dropout_rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed ^ 0x000D_5090_u64)),
        })
    }

    /// The configuration this network was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Number of trainable parameters.
    pub fn param_count(&self) -> usize {
        self.config.param_count()
    }

    /// Restarts the dropout random stream, so a training run is reproducible.
    pub fn reseed_dropout(&self, seed: u64) {
        if let Ok(mut rng) = self.dropout_rng.lock() {
            *rng = ChaCha8Rng::seed_from_u64(seed);
        }
    }

    /// Logits `[N, K]` for a batch `[N, C, T]`. `train` enables dropout and batch statistics
    /// (and updates the batch-norm running statistics).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (_, c, t) = x.dims3()?;
        if c != self.config.in_channels || t != self.config.window {
            candle_core::bail!(
                "input is [batch, {c}, {t}] but the model expects [batch, {}, {}]",
                self.config.in_channels,
                self.config.window
            );
        }
        // Channels last inside the network: every conv is then one [N·L, k·C] × [k·C, out]
        // product. (candle 0.11's own conv1d backward gives wrong kernel gradients.)
        let n = x.dim(0)?;
        let mut h = x.transpose(1, 2)?.contiguous()?;
        for block in &self.convs {
            let mut y = block.conv(&h)?;
            if let Some(bn) = &block.bn {
                y = bn.forward(&y, train)?;
            }
            h = y.relu()?.reshape((n, block.out_len, block.spec.out))?;
        }
        h = h.mean(1)?;
        for dense in &self.hidden {
            h = self.dropout(&h, train)?;
            h = dense.forward(&h)?.relu()?;
        }
        h = self.dropout(&h, train)?;
        self.head.forward(&h)
    }

    fn dropout(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let p = self.config.dropout;
        if !train || p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - p;
        let count = x.elem_count();
        let mask: Vec<f32> = {
            let mut rng = self
                .dropout_rng
                .lock()
                .map_err(|_| candle_core::Error::Msg("dropout rng lock poisoned".to_owned()))?;
            (0..count)
                .map(|_| {
                    if rng.gen::<f32>() < keep {
                        1.0 / keep
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?)
    }

    /// Variables in sorted name order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = match self.varmap.data().lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        let sorted: BTreeMap<_, _> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        sorted.into_iter().collect()
    }

    /// Trainable variables split into `(with weight decay, without)`: conv and linear
    /// weights decay; biases and batch-norm scales do not; running statistics are excluded.
    pub fn trainable_vars(&self) -> (Vec<Var>, Vec<Var>) {
        let specs: HashMap<String, ParamSpec> = param_specs(&self.config)
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let mut decay = Vec::new();
        let mut no_decay = Vec::new();
        for (name, var) in self.named_vars() {
            match specs.get(&name) {
                Some(s) if s.trainable && s.decay => decay.push(var),
                Some(s) if s.trainable => no_decay.push(var),
                _ => {}
            }
        }
        (decay, no_decay)
    }

    /// A copy of every variable's value (running statistics included).
    pub fn snapshot(&self) -> Result<Vec<(String, Tensor)>, ModelError> {
        self.named_vars()
            .into_iter()
            .map(|(name, var)| Ok((name, var.as_tensor().copy()?)))
            .collect()
    }

    /// Puts back values taken by [`Net::snapshot`].
    pub fn restore(&self, snapshot: &[(String, Tensor)]) -> Result<(), ModelError> {
        let vars: HashMap<String, Var> = self.named_vars().into_iter().collect();
        for (name, value) in snapshot {
            let var = vars.get(name).ok_or_else(|| {
                ModelError::Config(format!("snapshot holds `{name}`, which this network lacks"))
            })?;
            var.set(value)?;
        }
        Ok(())
    }

    /// Builds a network from named tensors: exactly the names and shapes that `config` needs
    /// (those of [`Net::named_vars`]), for example weights read back from an ONNX file.
    /// `seed` seeds dropout only.
    pub fn from_named(
        config: ModelConfig,
        tensors: HashMap<String, Tensor>,
        seed: u64,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        let specs = param_specs(&config);
        let mut problems = Vec::new();
        for s in &specs {
            match tensors.get(&s.name) {
                None => problems.push(format!("tensor `{}` missing", s.name)),
                Some(t) if t.dims() != s.shape.as_slice() => problems.push(format!(
                    "tensor `{}` has shape {:?}, the config needs {:?}",
                    s.name,
                    t.dims(),
                    s.shape
                )),
                Some(_) => {}
            }
        }
        if tensors.len() != specs.len() {
            let known: std::collections::HashSet<&str> =
                specs.iter().map(|s| s.name.as_str()).collect();
            for name in tensors.keys().filter(|k| !known.contains(k.as_str())) {
                problems.push(format!("unexpected tensor `{name}`"));
            }
        }
        if !problems.is_empty() {
            problems.sort();
            return Err(ModelError::Config(problems.join("; ")));
        }
        Self::from_tensors(config, tensors, seed)
    }

    /// An independent copy (same configuration, copied variables, running statistics included).
    pub fn try_clone(&self) -> Result<Self, ModelError> {
        let values = self.snapshot()?.into_iter().collect();
        Self::from_tensors(self.config.clone(), values, 0)
    }

    /// Grows the head to `new_k` classes: old rows are kept, new rows are drawn like a fresh
    /// head from `seed`. Optimisers created before this call no longer see the head.
    pub fn extend_head(&mut self, new_k: usize, seed: u64) -> Result<(), ModelError> {
        let old_k = self.config.num_classes;
        if new_k < old_k {
            return Err(ModelError::Config(format!(
                "extend_head can only grow the head: it has {old_k} classes, asked for {new_k}"
            )));
        }
        if new_k == old_k {
            return Ok(());
        }
        let fin = self.head.weight.dim(1)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let extra_w = draw(
            Init::LecunUniform { fan_in: fin },
            (new_k - old_k) * fin,
            &mut rng,
        );
        let extra_w = Tensor::from_vec(extra_w, (new_k - old_k, fin), &Device::Cpu)?;
        let extra_b = Tensor::zeros(new_k - old_k, DType::F32, &Device::Cpu)?;
        let w = Tensor::cat(&[&self.head.weight.detach(), &extra_w], 0)?;
        let b = Tensor::cat(&[&self.head.bias.detach(), &extra_b], 0)?;
        let wv = Var::from_tensor(&w)?;
        let bv = Var::from_tensor(&b)?;
        {
            let mut data = self
                .varmap
                .data()
                .lock()
                .map_err(|_| ModelError::Config("variable map lock poisoned".to_owned()))?;
            data.insert("head.weight".to_owned(), wv.clone());
            data.insert("head.bias".to_owned(), bv.clone());
        }
        self.head = Dense {
            weight: wv.as_tensor().clone(),
            bias: bv.as_tensor().clone(),
        };
        self.config.num_classes = new_k;
        Ok(())
    }

    /// The network in inference form (batch norm folded into the convs).
    pub fn folded(&self) -> Result<FoldedNet, ModelError> {
        let mut convs = Vec::with_capacity(self.convs.len());
        let mut cin = self.config.in_channels;
        for block in &self.convs {
            let out = block.spec.out;
            let k = block.spec.kernel;
            let mut weight = block.weight.flatten_all()?.to_vec1::<f32>()?;
            let bias = match (&block.bn, &block.bias) {
                (Some(bn), _) => {
                    let mean = bn.running_mean.as_tensor().to_vec1::<f32>()?;
                    let var = bn.running_var.as_tensor().to_vec1::<f32>()?;
                    let gamma = bn.gamma.to_vec1::<f32>()?;
                    let beta = bn.beta.to_vec1::<f32>()?;
                    let mut bias = vec![0.0f32; out];
                    for o in 0..out {
                        let scale = gamma[o] / (var[o] + BN_EPS as f32).sqrt();
                        for w in &mut weight[o * cin * k..(o + 1) * cin * k] {
                            *w *= scale;
                        }
                        bias[o] = beta[o] - mean[o] * scale;
                    }
                    bias
                }
                (None, Some(b)) => b.to_vec1::<f32>()?,
                (None, None) => vec![0.0; out],
            };
            convs.push(FoldedConv {
                spec: block.spec,
                in_channels: cin,
                pad: block.pad,
                weight,
                bias,
            });
            cin = out;
        }
        let dense = |d: &Dense| -> Result<FoldedDense, ModelError> {
            let (out, inp) = d.weight.dims2()?;
            Ok(FoldedDense {
                out,
                inp,
                weight: d.weight.flatten_all()?.to_vec1::<f32>()?,
                bias: d.bias.to_vec1::<f32>()?,
            })
        };
        Ok(FoldedNet {
            convs,
            hidden: self
                .hidden
                .iter()
                .map(dense)
                .collect::<Result<Vec<_>, _>>()?,
            head: dense(&self.head)?,
        })
    }

    /// Writes the weights to `path` (safetensors) and a JSON sidecar (same path, extension
    /// `json`) holding the [`ModelConfig`] and the caller's `extra` (classes, standardiser, ...).
    /// Returns the sidecar path.
    pub fn save(&self, path: &Path, extra: &serde_json::Value) -> Result<PathBuf, ModelError> {
        let sidecar = sidecar_path(path);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| ModelError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let tensors: HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect();
        candle_core::safetensors::save(&tensors, path)?;
        let meta = CheckpointMeta {
            format: CHECKPOINT_FORMAT.to_owned(),
            config: self.config.clone(),
            extra: extra.clone(),
        };
        let json = serde_json::to_vec_pretty(&meta).map_err(|source| ModelError::Sidecar {
            path: sidecar.clone(),
            source,
        })?;
        std::fs::write(&sidecar, json).map_err(|source| ModelError::Io {
            path: sidecar.clone(),
            source,
        })?;
        Ok(sidecar)
    }

    /// Reads a checkpoint written by [`Net::save`]; returns the network and the `extra` value.
    pub fn load(path: &Path) -> Result<(Self, serde_json::Value), ModelError> {
        let sidecar = sidecar_path(path);
        let text = std::fs::read(&sidecar).map_err(|source| ModelError::Io {
            path: sidecar.clone(),
            source,
        })?;
        let meta: CheckpointMeta =
            serde_json::from_slice(&text).map_err(|source| ModelError::Sidecar {
                path: sidecar.clone(),
                source,
            })?;
        if meta.format != CHECKPOINT_FORMAT {
            return Err(ModelError::Checkpoint {
                path: sidecar,
                detail: format!(
                    "format is `{}`, expected `{CHECKPOINT_FORMAT}`",
                    meta.format
                ),
            });
        }
        meta.config.validate()?;
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
            ModelError::Checkpoint {
                path: path.to_path_buf(),
                detail: format!("not a safetensors file: {e}"),
            }
        })?;
        let specs = param_specs(&meta.config);
        let mut problems = Vec::new();
        for s in &specs {
            match tensors.get(&s.name) {
                None => problems.push(format!("tensor `{}` missing", s.name)),
                Some(t) if t.dims() != s.shape.as_slice() => problems.push(format!(
                    "tensor `{}` has shape {:?}, the config needs {:?}",
                    s.name,
                    t.dims(),
                    s.shape
                )),
                Some(_) => {}
            }
        }
        let known: std::collections::HashSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        for name in tensors.keys().filter(|k| !known.contains(k.as_str())) {
            problems.push(format!("unexpected tensor `{name}`"));
        }
        if !problems.is_empty() {
            problems.sort();
            return Err(ModelError::Checkpoint {
                path: path.to_path_buf(),
                detail: problems.join("; "),
            });
        }
        let net = Self::from_tensors(meta.config, tensors, 0)?;
        Ok((net, meta.extra))
    }
}

/// The JSON sidecar of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Always [`CHECKPOINT_FORMAT`].
    pub format: String,
    /// The network's configuration.
    pub config: ModelConfig,
    /// Whatever the caller stored (classes, standardiser, metrics, ...).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// The sidecar path of a checkpoint: the weights path with extension `json`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(n: usize, c: usize, t: usize) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let v: Vec<f32> = (0..n * c * t).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, (n, c, t), &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn default_sizes_fit_the_edge_and_cloud_budgets() {
        // Student for 6 channels, 5 classes, by hand: conv 6·32·5 = 960, 32·64·5 = 10240,
        // 64·64·5 = 20480; batch norm γ,β: 2·(32+64+64) = 320; head 64·5 + 5 = 325 → 32325.
        let s = ModelConfig::student(6, 128, 5);
        assert_eq!(s.param_count(), 32_325);
        // Teacher: conv 6·48·5 + 48·96·5 + 96·128·3 + 128·192·3 + 192·256·3 = 282_528;
        // batch norm 2·(48+96+128+192+256) = 1440; fc 256·128 + 128 = 32_896; head 128·5 + 5 = 645.
        let t = ModelConfig::teacher(6, 128, 5);
        assert_eq!(t.param_count(), 282_528 + 1440 + 32_896 + 645);
        assert_eq!(Net::new(s, 0).unwrap().param_count(), 32_325);
    }

    #[test]
    fn same_padding_keeps_ceil_length_and_allows_fast_backward() {
        assert_eq!(ConvSpec::new(8, 5, 1).geometry(128), (128, 2, 2));
        assert_eq!(ConvSpec::new(8, 5, 2).geometry(128), (64, 1, 2));
        assert_eq!(ConvSpec::new(8, 3, 2).geometry(33), (17, 1, 1));
        assert_eq!(
            ModelConfig::student(6, 128, 5).lengths(),
            vec![128, 128, 64, 32]
        );
    }

    #[test]
    fn forward_gives_one_row_of_logits_per_window_and_checks_the_input() {
        let net = Net::new(ModelConfig::teacher(3, 50, 4), 1).unwrap();
        let logits = net.forward_t(&input(7, 3, 50), false).unwrap();
        assert_eq!(logits.dims(), &[7, 4]);
        let logits = net.forward_t(&input(2, 3, 50), true).unwrap();
        assert_eq!(logits.dims(), &[2, 4]);
        let err = net
            .forward_t(&input(2, 4, 50), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[batch, 4, 50]") && err.contains("[batch, 3, 50]"),
            "{err}"
        );
    }

    #[test]
    fn initialisation_is_determined_by_the_seed() {
        let cfg = ModelConfig::student(2, 20, 3);
        let x = input(3, 2, 20);
        let a = Net::new(cfg.clone(), 7)
            .unwrap()
            .forward_t(&x, false)
            .unwrap();
        let b = Net::new(cfg.clone(), 7)
            .unwrap()
            .forward_t(&x, false)
            .unwrap();
        let c = Net::new(cfg, 8).unwrap().forward_t(&x, false).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        assert!(max_abs_diff(&a, &c) > 1e-3);
    }

    #[test]
    fn invalid_configs_are_rejected_with_every_problem() {
        let mut cfg = ModelConfig::student(0, 16, 1);
        cfg.convs.push(ConvSpec::new(4, 1, 2));
        cfg.dropout = 1.0;
        let err = Net::new(cfg, 0).unwrap_err().to_string();
        for needle in [
            "in_channels",
            "num_classes",
            "kernel 1 smaller than stride 2",
            "dropout",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
    }

    #[test]
    fn checkpoint_round_trip_restores_outputs_and_extra() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/student.safetensors");
        let net = Net::new(ModelConfig::student(2, 24, 3), 4).unwrap();
        let x = input(4, 2, 24);
        net.forward_t(&x, true).unwrap(); // move the batch-norm statistics off their defaults
        let extra = serde_json::json!({"classes": ["a", "b", "c"]});
        let sidecar = net.save(&path, &extra).unwrap();
        assert_eq!(sidecar, dir.path().join("sub/student.json"));
        let (back, got_extra) = Net::load(&path).unwrap();
        assert_eq!(got_extra, extra);
        assert_eq!(back.config(), net.config());
        let (a, b) = (
            net.forward_t(&x, false).unwrap(),
            back.forward_t(&x, false).unwrap(),
        );
        assert_eq!(max_abs_diff(&a, &b), 0.0);
    }

    #[test]
    fn checkpoint_with_weights_of_another_shape_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        Net::new(ModelConfig::student(2, 24, 3), 4)
            .unwrap()
            .save(&path, &serde_json::Value::Null)
            .unwrap();
        let meta = CheckpointMeta {
            format: CHECKPOINT_FORMAT.to_owned(),
            config: ModelConfig::student(2, 24, 4),
            extra: serde_json::Value::Null,
        };
        std::fs::write(sidecar_path(&path), serde_json::to_vec(&meta).unwrap()).unwrap();
        let err = Net::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("head.weight") && err.contains("[3, 64]"),
            "{err}"
        );
    }

    #[test]
    fn extended_head_keeps_the_old_class_scores() {
        let mut net = Net::new(ModelConfig::student(2, 24, 3), 4).unwrap();
        let x = input(5, 2, 24);
        let before = net.forward_t(&x, false).unwrap();
        net.extend_head(5, 9).unwrap();
        let after = net.forward_t(&x, false).unwrap();
        assert_eq!(after.dims(), &[5, 5]);
        assert_eq!(max_abs_diff(&before, &after.narrow(1, 0, 3).unwrap()), 0.0);
        assert_eq!(net.config().num_classes, 5);
        let (decay, _) = net.trainable_vars();
        assert!(decay.iter().any(|v| v.dims() == [5, 64]));
        assert!(net.extend_head(4, 0).is_err());
    }

    /// Central differences (step 1e-3 on f32, relative tolerance 5 % + 2e-4 absolute) against candle's
    /// backward pass, for every parameter tensor of a net with strided, asymmetrically
    /// padded convs, batch norm and a hidden layer.
    #[test]
    fn gradients_match_finite_differences() {
        let mut cfg = ModelConfig::student(2, 17, 3);
        cfg.hidden = vec![6];
        cfg.dropout = 0.0;
        cfg.convs = vec![
            ConvSpec::new(4, 5, 1),
            ConvSpec::new(5, 3, 2),
            ConvSpec::new(6, 4, 3),
        ];
        let net = Net::new(cfg, 2).unwrap();
        let x = input(4, 2, 17);
        let y = Tensor::new(&[0u32, 1, 2, 1], &Device::Cpu).unwrap();
        let loss = |net: &Net| -> Tensor {
            let logits = net.forward_t(&x, true).unwrap();
            let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1).unwrap();
            logp.gather(&y.unsqueeze(1).unwrap(), 1)
                .unwrap()
                .mean_all()
                .unwrap()
                .neg()
                .unwrap()
        };
        let grads = loss(&net).backward().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (name, var) in net.named_vars() {
            if name.contains("running") {
                continue;
            }
            let analytic = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for _ in 0..4 {
                let i = rng.gen_range(0..base.len());
                let at = |delta: f32| {
                    let mut v = base.clone();
                    v[i] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss(&net).to_scalar::<f32>().unwrap()
                };
                let h = 1e-3;
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let a = analytic[i];
                assert!(
                    (a - numeric).abs() <= 0.05 * a.abs().max(numeric.abs()) + 2e-4,
                    "{name}[{i}]: backward {a}, finite differences {numeric}"
                );
            }
        }
    }

    #[test]
    fn snapshot_and_restore_bring_back_earlier_weights() {
        let net = Net::new(ModelConfig::student(2, 24, 3), 4).unwrap();
        let x = input(4, 2, 24);
        let before = net.forward_t(&x, false).unwrap();
        let snap = net.snapshot().unwrap();
        for (_, var) in net.named_vars() {
            var.set(&var.as_tensor().affine(0.5, 0.1).unwrap()).unwrap();
        }
        assert!(max_abs_diff(&before, &net.forward_t(&x, false).unwrap()) > 1e-4);
        net.restore(&snap).unwrap();
        assert_eq!(
            max_abs_diff(&before, &net.forward_t(&x, false).unwrap()),
            0.0
        );
    }
}
