"use strict";
var __createBinding = (this && this.__createBinding) || (Object.create ? (function(o, m, k, k2) {
    if (k2 === undefined) k2 = k;
    var desc = Object.getOwnPropertyDescriptor(m, k);
    if (!desc || ("get" in desc ? !m.__esModule : desc.writable || desc.configurable)) {
      desc = { enumerable: true, get: function() { return m[k]; } };
    }
    Object.defineProperty(o, k2, desc);
}) : (function(o, m, k, k2) {
    if (k2 === undefined) k2 = k;
    o[k2] = m[k];
}));
var __setModuleDefault = (this && this.__setModuleDefault) || (Object.create ? (function(o, v) {
    Object.defineProperty(o, "default", { enumerable: true, value: v });
}) : function(o, v) {
    o["default"] = v;
});
var __importStar = (this && this.__importStar) || (function () {
    var ownKeys = function(o) {
        ownKeys = Object.getOwnPropertyNames || function (o) {
            var ar = [];
            for (var k in o) if (Object.prototype.hasOwnProperty.call(o, k)) ar[ar.length] = k;
            return ar;
        };
        return ownKeys(o);
    };
    return function (mod) {
        if (mod && mod.__esModule) return mod;
        var result = {};
        if (mod != null) for (var k = ownKeys(mod), i = 0; i < k.length; i++) if (k[i] !== "default") __createBinding(result, mod, k[i]);
        __setModuleDefault(result, mod);
        return result;
    };
})();
Object.defineProperty(exports, "__esModule", { value: true });
exports.RESOURCES = exports.STAGES = exports.REPO_ROOT = void 0;
exports.resourceName = resourceName;
exports.exampleConfig = exampleConfig;
exports.configNumber = configNumber;
// What the workers call their AWS resources and which queues each stage uses: read from the one
// file the workers compile in (core/src/backend/aws/resources.json), so the two cannot drift.
// The pipeline's defaults (receives before a DLQ, visibility timeout…) come from
// sluice.example.toml, which a Rust test keeps equal to the workers' own defaults.
const fs = __importStar(require("fs"));
const path = __importStar(require("path"));
/** The repository root (this file runs from deploy/cdk/build/lib). */
exports.REPO_ROOT = path.resolve(__dirname, '..', '..', '..', '..');
exports.STAGES = ['ingest', 'features', 'inference', 'results'];
exports.RESOURCES = JSON.parse(fs.readFileSync(path.join(exports.REPO_ROOT, 'core', 'src', 'backend', 'aws', 'resources.json'), 'utf8'));
/** `<prefix>-<name>`, as the workers' `Names` builds it. */
function resourceName(prefix, name) {
    return `${prefix}-${name}`;
}
/** The defaults of sluice.example.toml, as `section.key` → value (numbers and strings only). */
function exampleConfig(file = path.join(exports.REPO_ROOT, 'sluice.example.toml')) {
    const values = new Map();
    let section = '';
    for (const raw of fs.readFileSync(file, 'utf8').split('\n')) {
        const line = raw.replace(/#.*$/, '').trim();
        const header = /^\[([a-z_.]+)\]$/.exec(line);
        if (header) {
            section = header[1];
            continue;
        }
        const pair = /^([a-z_]+)\s*=\s*"?([^"]*)"?$/.exec(line);
        if (pair)
            values.set(`${section}.${pair[1]}`, pair[2]);
    }
    return values;
}
/** One numeric default of sluice.example.toml, or an error naming it. */
function configNumber(key, config = exampleConfig()) {
    const value = Number(config.get(key));
    if (!Number.isFinite(value))
        throw new Error(`sluice.example.toml has no number ${key}`);
    return value;
}
