use candle_core::{DType, Device, Tensor};
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let model =
        sora::pipeline::WanModel::load(std::path::Path::new("/tmp/evalmodel"), &dev, DType::F32)?;
    let dir = std::path::Path::new("/work/train-run/model");
    let lat = candle_core::safetensors::load(dir.join("latents.safetensors"), &dev)?;
    let caps: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("captions.json"))?)?;
    let x0 = lat["latents"].get(0)?.unsqueeze(0)?;
    let cap = caps["captions"][0][0].as_str().unwrap().to_string();
    let ctx = sora::pipeline::encode_prompts(&model, &[&cap])?;
    let ctx = model.transformer.embed_text(&ctx)?;
    let noise = sora::pipeline::seeded_noise((1, 8, 5, 16, 16), 3, &dev)?;
    for sig in [0.2f32, 0.5, 0.8, 0.95] {
        let xt = ((&x0 * (1.0 - sig as f64))? + (&noise * sig as f64)?)?;
        let v = model.transformer.forward_embedded(
            &xt,
            &Tensor::new(&[sig * 1000.0], &dev)?,
            &ctx,
            (0, 0, 0),
        )?;
        let target = (&noise - &x0)?;
        let mse = (&v - &target)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        let x0h = (&xt - (&v * sig as f64)?)?;
        let err = (&x0h - &x0)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        println!("sigma {sig}: v mse {mse:.4}, x0 mse {err:.4}");
        if sig == 0.8 {
            let z = model.vae.denormalize_latents(&x0h)?;
            let vid = model.vae.decode(&z)?;
            for (i, f) in sora::video::tensor_to_frames(&vid.get(0)?, None)?
                .iter()
                .enumerate()
            {
                sora::video::write_png(
                    &std::path::Path::new("/tmp/dp").join(format!("frame_{i:05}.png")),
                    f,
                )?;
            }
        }
    }
    println!("{cap}");
    Ok(())
}
