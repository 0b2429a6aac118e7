//! A word-level tokenizer for the synthetic world's captions, saved in the Hugging Face
//! `tokenizer.json` format with T5 conventions (`<pad>` = 0, `</s>` = 1, `<unk>` = 2), so the
//! inference path ([`crate::models::umt5::Umt5Tokenizer`]) loads it like UMT5's own.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tokenizers::normalizers::Lowercase;
use tokenizers::pre_tokenizers::punctuation::Punctuation;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// Padding token, id 0.
pub const PAD: &str = "<pad>";
/// End-of-sequence token appended to every encoding, id 1.
pub const EOS: &str = "</s>";
/// Unknown-word token, id 2.
pub const UNK: &str = "<unk>";

/// Builds a WordLevel tokenizer: ids 0–2 are `<pad>`, `</s>`, `<unk>`, then `vocab` in order
/// (duplicates skipped). Text is lowercased, split on whitespace and punctuation, and `</s>`
/// is appended (`"$A </s>"`). The text encoder's vocabulary size is
/// `tokenizer.get_vocab_size(true)`.
pub fn build_tokenizer(vocab: &[String]) -> Result<Tokenizer> {
    let mut map: HashMap<String, u32> = HashMap::new();
    for special in [PAD, EOS, UNK] {
        let id = map.len() as u32;
        map.insert(special.to_string(), id);
    }
    for word in vocab {
        if !map.contains_key(word) {
            let id = map.len() as u32;
            map.insert(word.clone(), id);
        }
    }
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(map.into_iter().collect())
        .unk_token(UNK.to_string())
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the word-level model: {e}"))?;
    let post = TemplateProcessing::builder()
        .try_single(format!("$A {EOS}"))
        .map_err(|e| anyhow::anyhow!("bad single template: {e}"))?
        .try_pair(format!("$A {EOS} $B {EOS}"))
        .map_err(|e| anyhow::anyhow!("bad pair template: {e}"))?
        .special_tokens(vec![(EOS, 1)])
        .build()
        .map_err(|e| anyhow::anyhow!("cannot build the post-processor: {e}"))?;
    let mut tok = Tokenizer::new(model);
    tok.with_normalizer(Some(Lowercase))
        .map_err(|e| anyhow::anyhow!("cannot set the normalizer: {e}"))?;
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        WhitespaceSplit.into(),
        Punctuation::default().into(),
    ])));
    tok.with_post_processor(Some(post));
    tok.add_special_tokens([
        AddedToken::from(PAD, true),
        AddedToken::from(EOS, true),
        AddedToken::from(UNK, true),
    ])
    .map_err(|e| anyhow::anyhow!("cannot add the special tokens: {e}"))?;
    Ok(tok)
}

/// [`build_tokenizer`] over the synthetic world's [`super::world::vocabulary`].
pub fn world_tokenizer() -> Result<Tokenizer> {
    build_tokenizer(&super::world::vocabulary())
}

/// Writes `tokenizer.json` and a sibling `tokenizer_config.json` (pad/eos/unk tokens,
/// `model_max_length` 512). `path` is the `tokenizer.json` file or a directory to put it in.
/// Returns the `tokenizer.json` path.
pub fn save_tokenizer(tok: &Tokenizer, path: &Path) -> Result<PathBuf> {
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path.to_path_buf()
    };
    tok.save(&file, true)
        .map_err(|e| anyhow::anyhow!("cannot write tokenizer {}: {e}", file.display()))?;
    let cfg = serde_json::json!({
        "pad_token": PAD,
        "eos_token": EOS,
        "unk_token": UNK,
        "model_max_length": 512,
    });
    let cfg_path = file.with_file_name("tokenizer_config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg)? + "\n")
        .with_context(|| format!("cannot write {}", cfg_path.display()))?;
    Ok(file)
}
