// `npm pack` gives an installable package: pack it, unpack it as node_modules/dwsps-client
// in a temporary project and import it by name.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const PACKAGE = resolve(dirname(fileURLToPath(import.meta.url)), "..");

test("npm pack makes a package that imports by name, with its types", () => {
  const tmp = mkdtempSync(join(tmpdir(), "dwsps-pack-"));
  try {
    const out = execFileSync("npm", ["pack", "--json", "--pack-destination", tmp], {
      cwd: PACKAGE,
      encoding: "utf8",
      stdio: ["ignore", "pipe", "pipe"],
    });
    const [info] = JSON.parse(out);
    const files = info.files.map((f) => f.path).sort();
    assert.deepEqual(files, ["README.md", "dwsps.d.ts", "dwsps.js", "package.json"]);
    const modules = join(tmp, "project", "node_modules");
    mkdirSync(modules, { recursive: true });
    execFileSync("tar", ["xzf", join(tmp, info.filename), "-C", modules]);
    const installed = join(modules, "dwsps-client");
    execFileSync("mv", [join(modules, "package"), installed]);
    assert.equal(
      readFileSync(join(installed, "dwsps.js"), "utf8"),
      readFileSync(join(PACKAGE, "dwsps.js"), "utf8"),
    );
    writeFileSync(
      join(tmp, "project", "check.mjs"),
      'import { Client, DwspsError } from "dwsps-client";\n' +
        'console.log(typeof Client, new DwspsError("timeout", "x").code);\n',
    );
    const printed = execFileSync(process.execPath, ["check.mjs"], {
      cwd: join(tmp, "project"),
      encoding: "utf8",
    });
    assert.equal(printed.trim(), "function timeout");
    assert.ok(readdirSync(installed).includes("dwsps.d.ts"));
    // The README travels alone: no link may point into the repository around it.
    const readme = readFileSync(join(installed, "README.md"), "utf8");
    assert.doesNotMatch(readme, /\]\((?!https?:|#)[^)]*\)/, "a relative link in the packed README");
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});
