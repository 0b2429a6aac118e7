//! `CausalConv3d` against diffusers' `WanCausalConv3d` (fixtures from scripts/reference/ref_vae.py):
//! front-only temporal padding, cached frames in place of padding, temporal stride, 1×1×1.
//! Tolerance: max abs error 1e-5 on f32 outputs of O(1).

use candle_core::Tensor;
use sora::nn::conv3d::CausalConv3d;

use crate::common::{assert_close, get, load};

const TOL: f32 = 1e-5;

fn conv(
    io: &std::collections::HashMap<String, Tensor>,
    case: &str,
    stride: (usize, usize, usize),
    padding: (usize, usize, usize),
) -> CausalConv3d {
    let w = get(io, &format!("{case}.weight"));
    let b = get(io, &format!("{case}.bias"));
    CausalConv3d::from_weights(&w, Some(b), stride, padding).unwrap()
}

#[test]
fn conv3d_plain_k3_matches_reference() {
    let io = load("conv3d.safetensors");
    let c = conv(&io, "plain", (1, 1, 1), (1, 1, 1));
    assert_eq!(c.causal_padding(), 2);
    let y = c.forward(&get(&io, "plain.x"), None).unwrap();
    assert_close("conv3d k3 pad1", &y, &get(&io, "plain.y"), TOL);
}

#[test]
fn conv3d_causal_padding_is_two_front_zero_frames() {
    // `manual.y` is torch conv3d on the input zero-padded by 2 frames in front and none behind.
    let io = load("conv3d.safetensors");
    let c = conv(&io, "plain", (1, 1, 1), (1, 1, 1));
    let y = c.forward(&get(&io, "plain.x"), None).unwrap();
    assert_close(
        "conv3d vs front-padded F.conv3d",
        &y,
        &get(&io, "manual.y"),
        TOL,
    );
}

#[test]
fn conv3d_cache_replaces_front_padding() {
    let io = load("conv3d.safetensors");
    for n in [1, 2] {
        let case = format!("cache{n}");
        let c = conv(&io, &case, (1, 1, 1), (1, 1, 1));
        let cache = get(&io, &format!("{case}.cache"));
        assert_eq!(cache.dim(2).unwrap(), n);
        let y = c
            .forward(&get(&io, &format!("{case}.x")), Some(&cache))
            .unwrap();
        assert_close(
            &format!("conv3d with {n} cached frames"),
            &y,
            &get(&io, &format!("{case}.y")),
            TOL,
        );
    }
}

#[test]
fn conv3d_temporal_stride_matches_reference() {
    let io = load("conv3d.safetensors");
    let c = conv(&io, "tstride", (2, 1, 1), (0, 0, 0));
    let y = c.forward(&get(&io, "tstride.x"), None).unwrap();
    assert_eq!(
        y.dim(2).unwrap(),
        2,
        "5 frames, kernel 3, stride 2 -> 2 frames"
    );
    assert_close(
        "conv3d (3,1,1) stride (2,1,1)",
        &y,
        &get(&io, "tstride.y"),
        TOL,
    );
}

#[test]
fn conv3d_pointwise_matches_reference() {
    let io = load("conv3d.safetensors");
    let c = conv(&io, "one", (1, 1, 1), (0, 0, 0));
    assert_eq!((c.in_channels(), c.out_channels()), (4, 6));
    let y = c.forward(&get(&io, "one.x"), None).unwrap();
    assert_close("conv3d 1x1x1 (batch 2)", &y, &get(&io, "one.y"), TOL);
}
