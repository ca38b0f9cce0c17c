// Where the essayflow binary is, for the generator (scripts/generate.mjs) and the tests
// (test/harness.ts): $ESSAYFLOW_BIN, else $CARGO_TARGET_DIR/debug/essayflow, else
// target/debug/essayflow at the repository's root (`cargo build --bin essayflow`).
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** The repository's root directory. */
export const root = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

/** The binary's path; throws, saying how to build it, when it is missing. */
export function essayflowBinary() {
  if (process.env.ESSAYFLOW_BIN) return process.env.ESSAYFLOW_BIN;
  const target = process.env.CARGO_TARGET_DIR ? resolve(root, process.env.CARGO_TARGET_DIR) : join(root, "target");
  const bin = join(target, "debug", "essayflow");
  if (!existsSync(bin)) {
    throw new Error(`${bin} does not exist: run \`cargo build --bin essayflow\` or set ESSAYFLOW_BIN`);
  }
  return bin;
}
