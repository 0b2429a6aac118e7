use candle_core::{DType, Device, Tensor};
fn main() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let model = sora::pipeline::WanModel::load(std::path::Path::new("/work/main/weights"), &dev, DType::F32)?;
    let x = sora::pipeline::seeded_noise((2, 8, 5, 16, 16), 3, &dev)?;
    let ctx = Tensor::randn(0f32, 1.0, (2, 16, 64), &dev)?;
    let t = Tensor::new(&[500f32, 900.0], &dev)?;
    let a = model.transformer.forward(&x, &t, &ctx)?;
    sora::nn::set_differentiable(true);
    let b = model.transformer.forward(&x, &t, &ctx)?;
    sora::nn::set_differentiable(false);
    println!("dit train-mode vs inference-mode max diff {}", (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?);
    let z = sora::pipeline::seeded_noise((1, 8, 3, 16, 16), 4, &dev)?;
    let d1 = model.vae.decode(&z)?;
    sora::nn::set_differentiable(true);
    let d2 = model.vae.decode(&z)?;
    println!("vae train-mode vs inference-mode max diff {}", (&d1 - &d2)?.abs()?.max_all()?.to_scalar::<f32>()?);
    Ok(())
}
