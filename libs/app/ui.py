"""The gradio page of app.py (imported by app.py only): a Sample tab and an Edit tab over libs.app.logic.

Every handler runs the logic module and shows problems as `error: <one line>` in the tab's status box, never a
traceback (a bug is logged with its traceback on the server and named in one line on the page).
"""
import logging

import gradio as gr

from libs.app import logic
from libs.errors import BadInput, MissingInput, NonFiniteValues, UserError, one_line
from libs.sampling.decoding import GUIDANCE_SCHEDULES, ORDERS
from libs.sampling.editing import masked_preview

log = logging.getLogger("app")
NO_STRATEGY = "(none: the controls above)"
BRUSH_COLOR = "#ff00ff"


def guarded(fn, n_outputs: int):
    """fn(*inputs) -> outputs whose last one is the status line; a user error leaves the other outputs as they are
    and shows `error: ...` in the status."""
    def run(*inputs):
        try:
            return fn(*inputs)
        except (UserError, NonFiniteValues) as e:
            message = f"error: {one_line(e)}"
        except Exception as e:  # noqa: BLE001 - a bug: the traceback goes to the server log, one line to the page
            log.exception("app handler failed")
            message = f"error: internal error ({type(e).__name__}: {one_line(e)}); the server log has the traceback"
        return (*[gr.update() for _ in range(n_outputs - 1)], message)
    return run


def settings_of(schedule, strategy, steps, cfg, temp, guidance_schedule, guidance_power, guidance_steps, order,
                seed) -> logic.Settings:
    """The page's decoding controls -> logic.Settings (see logic.page_settings for which controls apply)."""
    return logic.page_settings(schedule, None if strategy == NO_STRATEGY else strategy, steps, cfg, temp,
                               guidance_schedule, guidance_power, guidance_steps, order, seed)


def build_page(models: logic.Models, strategies: list) -> gr.Blocks:
    """The Blocks page for loaded `models`; `strategies`: strategy files offered in the menu."""
    sample = models.config.sample
    factor = logic.display_factor(models.resolution)
    size = models.resolution * factor
    classes = [(models.class_label(c), c) for c in range(models.num_classes)]
    with gr.Blocks(title="ka-mig: sample and edit") as page:
        gr.Markdown(f"### ka-mig: sample and edit\n{models.note}; model `{models.kind}`, "
                    f"{models.resolution}x{models.resolution} images, {models.num_classes} classes, "
                    f"device {models.device}.")
        grid_images = gr.State(None)  # uint8 [N,R,R,3] of the last grid
        edit_image = gr.State(None)   # uint8 [R,R,3] being edited
        with gr.Accordion("Decoding settings (both tabs)", open=True):
            with gr.Row():
                schedule = gr.Radio(["maskgit", "autonat"], value=sample.schedule, label="schedule",
                                    info="maskgit: cosine over the steps below; autonat: the config's per-step lists")
                strategy = gr.Dropdown([NO_STRATEGY, *strategies], value=NO_STRATEGY, label="strategy file",
                                       info="replaces the schedule controls (guidance steps and order still apply)")
                seed = gr.Number(0, precision=0, minimum=0, label="seed", info="sample i uses generator (seed, i)",
                                 elem_id="seed")
            with gr.Row():
                steps = gr.Slider(1, 32, value=int(sample.get("steps", 8)), step=1, label="steps (maskgit)",
                                  elem_id="steps")
                cfg = gr.Slider(0, 10, value=float(sample.get("cfg_scale", 2.0)), step=0.1,
                                label="guidance scale (maskgit)")
                temp = gr.Slider(0, 10, value=float(sample.get("temp", 4.5)), step=0.1,
                                 label="confidence temperature (maskgit)")
            with gr.Row():
                guidance_schedule = gr.Dropdown(list(GUIDANCE_SCHEDULES), value=sample.get("guidance_schedule", "linear"),
                                                label="guidance schedule (maskgit)")
                guidance_power = gr.Number(float(sample.get("guidance_power", 1.0)), minimum=0,
                                           label="guidance power (pow-cosine)")
                guidance_steps = gr.Textbox(str(sample.get("guidance_steps", "all")), label="guidance steps",
                                            info="'all', or indices and ranges: 4-7, 0,2,5")
                order = gr.Radio(list(ORDERS), value=sample.get("order", "confidence"), label="order")
        decoding = [schedule, strategy, steps, cfg, temp, guidance_schedule, guidance_power, guidance_steps, order,
                    seed]
        with gr.Tab("Sample", id="sample"):
            with gr.Row():
                pick = gr.CheckboxGroup(classes, value=[0], label="classes", elem_id="classes")
                per_class = gr.Slider(1, 8, value=4, step=1, label="images per class", elem_id="per_class")
            sample_button = gr.Button("Sample", variant="primary", elem_id="sample_button")
            sample_status = gr.Textbox(label="status", interactive=False, elem_id="sample_status")
            grid = gr.Image(label="grid", type="pil", format="png", interactive=False, elem_id="grid")
        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                upload = gr.File(label="upload an image (PNG, JPEG, ...)", type="filepath", elem_id="upload")
                with gr.Column():
                    grid_index = gr.Number(0, precision=0, minimum=0, label="or take image i of the last grid")
                    take = gr.Button("Take it", elem_id="take_button")
            editor = gr.ImageEditor(label="paint the region to regenerate", type="numpy", sources=(), transforms=(),
                                    layers=False, format="png", canvas_size=(size, size), fixed_canvas=True,
                                    brush=gr.Brush(colors=[BRUSH_COLOR], color_mode="fixed",
                                                   default_size=max(4, size // 8)),
                                    elem_id="editor")
            with gr.Row():
                mode = gr.Radio(list(logic.EDIT_MODES), value="inpaint", label="mode",
                                info="inpaint: regenerate the painted region; outpaint: everything else")
                edit_class = gr.Dropdown(classes, value=0, label="class the region is regenerated under",
                                         elem_id="edit_class")
                variants = gr.Slider(1, 8, value=4, step=1, label="variants", elem_id="variant_count")
            edit_button = gr.Button("Edit", variant="primary", elem_id="edit_button")
            edit_status = gr.Textbox(label="status", interactive=False, elem_id="edit_status")
            region = gr.Image(label="input, regenerated tokens greyed", type="numpy", format="png",
                              interactive=False, elem_id="region")
            gallery = gr.Gallery(label="variants", format="png", columns=4, fit_columns=False, elem_id="variants")

        def do_sample(chosen, n, *controls):
            settings = settings_of(*controls)
            images, labels = logic.sample_grid(models, chosen or [], int(n), settings)
            picture = logic.grid_image(models, images, labels, columns=int(n), factor=factor)
            return picture, images, f"{len(images)} images, classes {sorted(set(int(c) for c in labels))}, " \
                                    f"seed {settings.seed}"

        def show(image, note):
            """The editor showing `image` (upscaled, no brush yet), the state and the status."""
            canvas = {"background": logic.upscale(image, factor), "layers": [], "composite": None}
            return canvas, image, note

        def do_upload(path):
            image, note = logic.check_upload(path, models.resolution)
            return show(image, note)

        def do_take(images, i):
            if images is None:
                raise MissingInput("no grid yet: sample one in the Sample tab first")
            i = int(i or 0)
            if not 0 <= i < len(images):
                raise BadInput(f"image {i}: the last grid has images 0 to {len(images) - 1}")
            return show(images[i], f"image {i} of the last grid")

        def do_edit(image, canvas, how, cls, n, *controls):
            if image is None:
                raise MissingInput("no image: upload one or take one from the last grid first")
            brush = logic.brush_mask((canvas or {}).get("layers"), models.resolution)
            result = logic.run_edit(models, image, logic.edit_region(brush, how), cls, int(n), settings_of(*controls))
            preview = masked_preview(image, result.region)  # [R,R,3] the regenerated tokens greyed
            tiles = [(logic.upscale(e, factor), f"variant {k}") for k, e in enumerate(result.edits)]
            return (logic.upscale(preview, factor), tiles,
                    f"{len(result.edits)} variants, {int(result.unknown.sum())} of {len(result.unknown)} tokens "
                    f"regenerated under {models.class_label(int(cls))}")

        sample_button.click(guarded(do_sample, 3), [pick, per_class, *decoding], [grid, grid_images, sample_status])
        upload.upload(guarded(do_upload, 3), [upload], [editor, edit_image, edit_status]).then(
            lambda: None, None, upload)  # ready for the next file
        take.click(guarded(do_take, 3), [grid_images, grid_index], [editor, edit_image, edit_status])
        edit_button.click(guarded(do_edit, 3), [edit_image, editor, mode, edit_class, variants, *decoding],
                          [region, gallery, edit_status])
    return page


def launch(page: gr.Blocks, host: str, port: int):
    """Serves the page until interrupted (no share link, no server-side rendering, system fonts only)."""
    theme = gr.themes.Default(font=["ui-sans-serif", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    page.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=False, ssr_mode=False,
                                                   max_file_size=4 * logic.MAX_UPLOAD_BYTES, theme=theme,
                                                   footer_links=[], quiet=False, show_error=False)
