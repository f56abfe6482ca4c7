//! Data-parallel logistic regression over MPI: every rank generates the same
//! synthetic data set from a seed, takes its shard, computes the gradient sum
//! over it, and `all_reduce` adds the ranks' sums, so every rank applies the
//! same update. The result is the full-batch gradient descent a single process
//! gets (`--serial`) up to the order of floating-point additions.
//!
//! Usage: shoal-mpi-train [--serial] [--epochs N] [--samples N] [--features N] [--seed N]
//!        [--epoch-delay-ms N]   (a pause per epoch, to watch it or to stop it midway)
//! Writes `model.json` to $SHOAL_OUTPUT_DIR (rank 0; default ./outputs).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use mpi::collective::SystemOperation;
use mpi::traits::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Config {
    serial: bool,
    epochs: u32,
    samples: usize,
    features: usize,
    seed: u64,
    learning_rate: f64,
    epoch_delay: std::time::Duration,
}

fn parse() -> Result<Config, String> {
    let mut config = Config {
        serial: false,
        epochs: 30,
        samples: 6000,
        features: 8,
        seed: 7,
        learning_rate: 0.5,
        epoch_delay: std::time::Duration::ZERO,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value"))
                .and_then(|v| v.parse::<u64>().map_err(|e| format!("{name} {v}: {e}")))
        };
        match arg.as_str() {
            "--serial" => config.serial = true,
            "--epochs" => config.epochs = value("--epochs")? as u32,
            "--samples" => config.samples = value("--samples")? as usize,
            "--features" => config.features = value("--features")? as usize,
            "--seed" => config.seed = value("--seed")?,
            "--epoch-delay-ms" => {
                config.epoch_delay = std::time::Duration::from_millis(value("--epoch-delay-ms")?)
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if config.samples == 0 || config.features == 0 || config.epochs == 0 {
        return Err("--epochs, --samples and --features must be above 0".into());
    }
    Ok(config)
}

/// The data set: features in [-1, 1), labels from a hidden linear rule with 10% noise.
fn data(config: &Config) -> (Vec<Vec<f64>>, Vec<f64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let truth: Vec<f64> = (0..config.features)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let mut xs = Vec::with_capacity(config.samples);
    let mut ys = Vec::with_capacity(config.samples);
    for _ in 0..config.samples {
        let x: Vec<f64> = (0..config.features)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let score: f64 = x.iter().zip(&truth).map(|(a, b)| a * b).sum();
        let label = (score > 0.0) != (rng.random::<f64>() < 0.1);
        xs.push(x);
        ys.push(if label { 1.0 } else { 0.0 });
    }
    (xs, ys)
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Gradient sums (weights, then bias) and the summed log loss over one shard.
fn shard_sums(xs: &[Vec<f64>], ys: &[f64], w: &[f64], b: f64) -> Vec<f64> {
    let d = w.len();
    let mut sums = vec![0.0; d + 2];
    for (x, &y) in xs.iter().zip(ys) {
        let p = sigmoid(x.iter().zip(w).map(|(a, b)| a * b).sum::<f64>() + b);
        let err = p - y;
        for j in 0..d {
            sums[j] += err * x[j];
        }
        sums[d] += err;
        let p = p.clamp(1e-12, 1.0 - 1e-12);
        sums[d + 1] -= y * p.ln() + (1.0 - y) * (1.0 - p).ln();
    }
    sums
}

struct Model {
    weights: Vec<f64>,
    bias: f64,
    loss: f64,
}

/// Full-batch gradient descent; `reduce` adds every rank's sums in place.
fn train(config: &Config, rank: usize, size: usize, reduce: &dyn Fn(&mut Vec<f64>)) -> Model {
    let (xs, ys) = data(config);
    let n = config.samples;
    let (lo, hi) = (rank * n / size, (rank + 1) * n / size);
    let (xs, ys) = (&xs[lo..hi], &ys[lo..hi]);
    let d = config.features;
    let mut w = vec![0.0; d];
    let mut b = 0.0;
    for epoch in 1..=config.epochs {
        let mut sums = shard_sums(xs, ys, &w, b);
        reduce(&mut sums);
        let loss = sums[d + 1] / n as f64;
        for j in 0..d {
            w[j] -= config.learning_rate * sums[j] / n as f64;
        }
        b -= config.learning_rate * sums[d] / n as f64;
        std::thread::sleep(config.epoch_delay);
        if rank == 0 {
            println!(
                "epoch {epoch}/{} loss={loss:.12} progress={}%",
                config.epochs,
                100 * epoch / config.epochs
            );
        }
    }
    // The loss of the final model.
    let mut sums = shard_sums(xs, ys, &w, b);
    reduce(&mut sums);
    Model {
        weights: w,
        bias: b,
        loss: sums[d + 1] / n as f64,
    }
}

fn save(model: &Model, size: usize) -> Result<PathBuf, String> {
    let dir = PathBuf::from(std::env::var("SHOAL_OUTPUT_DIR").unwrap_or_else(|_| "outputs".into()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut json = String::from("{\"weights\": [");
    for (i, w) in model.weights.iter().enumerate() {
        let _ = write!(json, "{}{w:.15e}", if i == 0 { "" } else { ", " });
    }
    let _ = writeln!(
        json,
        "], \"bias\": {:.15e}, \"loss\": {:.15e}, \"ranks\": {size}}}",
        model.bias, model.loss
    );
    let path = dir.join("model.json");
    std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

fn main() -> ExitCode {
    let config = match parse() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("shoal-mpi-train: {e}");
            return ExitCode::from(2);
        }
    };
    let (model, rank, size) = if config.serial {
        (train(&config, 0, 1, &|_| {}), 0, 1)
    } else {
        let Some(universe) = mpi::initialize() else {
            eprintln!("shoal-mpi-train: MPI is already initialized");
            return ExitCode::FAILURE;
        };
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        // A check anyone can verify: the ranks' (rank + 1) add up to size(size+1)/2.
        let mut total = 0u64;
        world.all_reduce_into(&(rank as u64 + 1), &mut total, SystemOperation::sum());
        let expected = (size * (size + 1) / 2) as u64;
        let host = std::env::var("SHOAL_NODE_ID").unwrap_or_default();
        println!("rank {rank}/{size} on node {host}: allreduce sum={total} expected={expected}");
        if total != expected {
            eprintln!("shoal-mpi-train: allreduce gave {total}, expected {expected}");
            return ExitCode::FAILURE;
        }
        let reduce = |sums: &mut Vec<f64>| {
            let mut out = vec![0.0; sums.len()];
            world.all_reduce_into(&sums[..], &mut out[..], SystemOperation::sum());
            *sums = out;
        };
        (train(&config, rank, size, &reduce), rank, size)
    };
    if rank == 0 {
        match save(&model, size) {
            Ok(path) => println!(
                "final loss={:.12} ranks={size} model={}",
                model.loss,
                path.display()
            ),
            Err(e) => {
                eprintln!("shoal-mpi-train: cannot save the model: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
