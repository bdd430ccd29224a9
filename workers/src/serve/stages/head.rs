//! The `head` stage: a language model's final norm and LM head over the residual stream that
//! its last layers stage hands on, one GEMM over every session's rows of the epoch (the head
//! keeps no per-session state). Outputs of models that ran whole pass through.
//!
//! ```ignore
//! let outputs = hidden.head(models.clone());
//! ```

use std::sync::Arc;

use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;

use tideway_operators::tensor_parallel::Residual;

use super::super::messages::OpError;
use super::super::served::{ServedModel, StageModel};
use super::{Body, Envelope, StageLogic, stage_operator};

struct HeadLogic {
    models: Arc<Vec<ServedModel>>,
}

impl StageLogic<Envelope, Envelope> for HeadLogic {
    fn batch(&mut self, mut envelopes: Vec<Envelope>, out: &mut Vec<Envelope>) {
        for (index, served) in self.models.iter().enumerate() {
            let Some(Some(StageModel::Part(model))) = served.stages.last() else {
                continue;
            };
            let mine: Vec<usize> = (0..envelopes.len())
                .filter(|&i| {
                    envelopes[i].model == index as u32
                        && matches!(envelopes[i].body, Body::Hidden { .. })
                })
                .collect();
            if mine.is_empty() {
                continue;
            }
            let d = model.hidden_size();
            let mut residual = Residual::default();
            let mut pending = Vec::new();
            let mut rows = Vec::with_capacity(mine.len());
            for &i in &mine {
                let last_only = envelopes[i].last_only;
                if let Body::Hidden { values, pending: p } = &mut envelopes[i].body {
                    if last_only && values.len() > d {
                        values.drain(..values.len() - d);
                        if let Some(p) = p.as_mut() {
                            p.drain(..p.len() - d);
                        }
                    }
                    rows.push(values.len() / d);
                    residual.values.append(values);
                    if let Some(p) = p {
                        pending.append(p);
                    }
                }
            }
            if !pending.is_empty() {
                residual.pending = Some(pending);
            }
            match model.head(residual) {
                Ok(logits) => {
                    let width = model.output_width();
                    let mut rest = logits.data();
                    for (&i, &n) in mine.iter().zip(&rows) {
                        let (values, tail) = rest.split_at(n * width);
                        rest = tail;
                        envelopes[i].body = Body::Output {
                            rows: n as u32,
                            values: values.to_vec(),
                            skipped: Vec::new(),
                        };
                    }
                }
                Err(e) => {
                    for &i in &mine {
                        envelopes[i].body = Body::Failed(OpError::Input(e.clone()));
                    }
                }
            }
        }
        out.append(&mut envelopes);
    }
}

/// The head stage on a stream of envelopes (on the workers of each model's last stage).
pub trait Head<'s> {
    fn head(self, models: Arc<Vec<ServedModel>>) -> StreamVec<'s, u64, Envelope>;
}

impl<'s> Head<'s> for StreamVec<'s, u64, Envelope> {
    fn head(self, models: Arc<Vec<ServedModel>>) -> StreamVec<'s, u64, Envelope> {
        stage_operator(self, Pipeline, "Head", HeadLogic { models })
    }
}
