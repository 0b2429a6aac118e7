use candle_core::{DType, Device, Tensor};
fn main() -> anyhow::Result<()> {
    let dir = std::path::Path::new("/work/train-run/model");
    let cfg: sora::models::wan::WanVaeConfig =
        sora::weights::read_config(&dir.join("vae/config.json"))?;
    let vae =
        sora::models::wan::vae_keys::load_vae(&dir.join("vae"), &cfg, DType::F32, &Device::Cpu)?;
    let lat = candle_core::safetensors::load(dir.join("latents.safetensors"), &Device::Cpu)?;
    let l = lat["latents"].get(0)?.unsqueeze(0)?;
    println!(
        "latent mean {} std {}",
        l.mean_all()?,
        l.flatten_all()?.var(0)?
    );
    let z = vae.denormalize_latents(&l)?;
    let v = vae.decode(&z)?;
    let frames = sora::video::tensor_to_frames(&v.get(0)?, None)?;
    for (i, f) in frames.iter().enumerate() {
        sora::video::write_png(
            &std::path::Path::new("/tmp/lp").join(format!("frame_{i:05}.png")),
            f,
        )?;
    }
    let caps: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("captions.json"))?)?;
    println!("{}", caps["captions"][0]);
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    Ok(())
}
