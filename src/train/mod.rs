//! Training support: the procedural synthetic world, its tokenizer, and the prompt-following scorer.
pub mod checkpoint;
pub mod eval;
pub mod looper;
pub mod optim;
pub mod recipe;
pub mod tokenizer;
pub mod world;
