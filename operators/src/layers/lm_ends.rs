//! A language model's two ends, held by the pipeline parts that run them: the token embedding
//! (the first piece, which starts the residual stream) and the final RMSNorm with the LM head
//! (the last piece). A tied head reuses the embedding's matrix, held once (HF
//! `tie_word_embeddings`; fla and Mamba alike).

use rayon::prelude::*;
use tideway_kernels::matmul::{Linear, MatRef};
use tideway_kernels::norm::rms_norm;
use tideway_kernels::{Tensor, Weight};

use crate::checkpoint::Checkpoint;
use crate::error::{InputError, LoadError, ModelPiece};
use crate::models::{ModelPart, check_token_ids};

/// Where a family keeps its ends in the checkpoint, and their sizes.
pub struct EndsLayout<'a> {
    pub embedding: &'a str,
    pub norm: &'a str,
    pub head: &'a str,
    /// The head is the embedding's matrix.
    pub tied: bool,
    pub hidden: usize,
    /// Ids accepted: `0..vocab`.
    pub vocab: usize,
    /// Rows of the embedding and columns of the logits (a padded vocabulary may be larger).
    pub rows: usize,
    pub norm_eps: f32,
}

/// Tokens a task of a tied embedding's parallel lookup: 768 lines each at mamba-130m's width.
const EMBED_ROWS_A_TASK: usize = 32;

pub struct LmEnds {
    hidden: usize,
    vocab: usize,
    rows: usize,
    norm_eps: f32,
    /// The input embedding when it is not tied to the head.
    untied_embedding: Option<Weight>,
    norm: Option<Weight>,
    /// The head; with a tied embedding also the embedding (held by the first and last parts).
    head: Option<Linear>,
}

impl LmEnds {
    /// Loads the ends `part` holds: the embedding for the first part, the norm and the head
    /// for the last (a tied matrix for either).
    pub fn load(
        checkpoint: &Checkpoint,
        layout: EndsLayout<'_>,
        part: &ModelPart,
    ) -> Result<Self, LoadError> {
        let (d, rows) = (layout.hidden, layout.rows);
        let norm = match part.head {
            true => Some(checkpoint.load(layout.norm, &[d])?),
            false => None,
        };
        let (head, untied_embedding) = if layout.tied {
            let head = match part.embed || part.head {
                true => Some(checkpoint.load_linear(layout.embedding, None, rows, d)?),
                false => None,
            };
            (head, None)
        } else {
            let head = match part.head {
                true => Some(checkpoint.load_linear(layout.head, None, rows, d)?),
                false => None,
            };
            let embedding = match part.embed {
                true => Some(checkpoint.load(layout.embedding, &[rows, d])?),
                false => None,
            };
            (head, embedding)
        };
        Ok(LmEnds {
            hidden: d,
            vocab: layout.vocab,
            rows,
            norm_eps: layout.norm_eps,
            untied_embedding,
            norm,
            head,
        })
    }

    /// Columns of the logits.
    /// Ids accepted: `0..vocab_size`.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Width of the residual stream.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn logits_width(&self) -> usize {
        self.rows
    }

    /// Bytes of the parameters held (a tied matrix counted once).
    pub fn weight_bytes(&self) -> usize {
        self.untied_embedding.as_ref().map_or(0, Weight::size_bytes)
            + self.head.as_ref().map_or(0, Linear::size_bytes)
            + self.norm.as_ref().map_or(0, Weight::size_bytes)
    }

    /// The first piece: the embedding rows of `tokens` (`[T, hidden]`). A tied head keeps
    /// each row across `hidden` cache lines of its panels (one a step), so a prompt's rows
    /// are gathered on the compute pool, `EMBED_ROWS_A_TASK` a task: the lookups wait on
    /// memory, and two threads keep twice the lines in flight.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>, InputError> {
        let d = self.hidden;
        check_token_ids(tokens, self.vocab, 0)?;
        let mut residual = vec![0.0f32; tokens.len() * d];
        match (&self.untied_embedding, &self.head) {
            (Some(embedding), _) => {
                for (row, &t) in residual.chunks_exact_mut(d).zip(tokens) {
                    row.copy_from_slice(embedding.row(t as usize));
                }
            }
            (None, Some(tied)) => {
                let gather = |(rows, tokens): (&mut [f32], &[u32])| {
                    for (row, &t) in rows.chunks_exact_mut(d).zip(tokens) {
                        tied.torch_weight_row(t as usize, row);
                    }
                };
                let task = EMBED_ROWS_A_TASK * d;
                if tokens.len() > EMBED_ROWS_A_TASK {
                    tideway_kernels::cpu::on_compute_pool(|| {
                        residual
                            .par_chunks_mut(task)
                            .zip(tokens.par_chunks(EMBED_ROWS_A_TASK))
                            .for_each(gather)
                    });
                } else {
                    gather((&mut residual, tokens));
                }
            }
            (None, None) => {
                return Err(InputError::NotHeld {
                    piece: ModelPiece::Embedding,
                });
            }
        }
        Ok(residual)
    }

    /// The last piece: the final norm and the head over the settled stream (`[T, hidden]`).
    pub fn head(&self, residual: &[f32]) -> Result<Tensor, InputError> {
        let (Some(norm), Some(head)) = (&self.norm, &self.head) else {
            return Err(InputError::NotHeld {
                piece: ModelPiece::Head,
            });
        };
        let d = self.hidden;
        let m = residual.len() / d;
        let mut normed = vec![0.0f32; m * d];
        rms_norm(residual, d, norm.as_slice(), self.norm_eps, &mut normed);
        // Written once, by the product: zeroing the logits first cost ~8 ms of a 512-token
        // prefill (103 MB).
        let logits = head.forward_new(MatRef::dense(&normed, m, d));
        Ok(Tensor::from_vec(logits, &[m, self.rows]).expect("the head has `rows` outputs"))
    }
}
