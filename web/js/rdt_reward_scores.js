// Shows the Reward Scorer's table ({"ui": {"text": [table]}}) on the node after a run.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE = "RDTRewardScorer";
const WIDGET = "rdt_scores";

app.registerExtension({
  name: "rdt.RewardScorerTable",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = Array.isArray(message?.text) ? message.text.join("\n") : String(message?.text ?? "");
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        widget = ComfyWidgets["STRING"](this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false; // display only: not part of the saved widgets_values
        widget.options = { ...(widget.options || {}), serialize: false };
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.fontFamily = "monospace";
          widget.inputEl.style.opacity = 0.85;
        }
      }
      widget.value = text;
      this.setDirtyCanvas?.(true, true);
    };
  },
});
