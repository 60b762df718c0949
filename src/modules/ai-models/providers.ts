/**
 * Providers through the Vercel AI SDK. Credentials come from settings (the built-in `openai`,
 * `anthropic`, `google`) and from provider records passed in as plain objects (decrypted by the
 * caller; the storage comes later). A record with a built-in id replaces the settings for it.
 */
import { createOpenAI } from '@ai-sdk/openai';
import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import type { EmbeddingModel, JSONValue, LanguageModel } from 'ai';
import type { Agent } from 'undici';

import type { Settings } from '../../core/config.js';
import { HttpError } from '../../core/errors.js';
import { HOP_HEADER, hopMark } from '../../core/hop.js';

import { limitedFetch } from './answer-limit.js';
import { OpenAIWire, wireDispatcher } from './openai-wire.js';
import { loadedOnUse, providerSdks, type SdkLoader } from './provider-sdks.js';
import type { ProviderKind } from './types.js';

/** A provider as the DB layer will hand it over (secrets already decrypted). */
export interface ProviderRecord {
  /** `openai`, `anthropic`, `google` (replaces the settings) or a custom id such as `ollama`. */
  id: string;
  kind: ProviderKind;
  name?: string;
  base_url?: string | null;
  api_key?: string | null;
  headers?: Record<string, string> | null;
  enabled?: boolean;
  /** Secrets the record holds that could not be opened (sealed under another SECRET_KEY, or for another row): left out above. */
  unreadable?: readonly ('api_key' | 'headers')[];
}

export type ProviderCredentialSettings = Pick<
  Settings,
  'OPENAI_API_KEY' | 'OPENAI_BASE_URL' | 'ANTHROPIC_API_KEY' | 'GOOGLE_GENERATIVE_AI_API_KEY'
>;

/** The credentials, the most of an answer the SDK's providers may read (see answer-limit.ts), and the key of the hop mark every request carries (core/hop.ts). */
export type ProviderSettings = ProviderCredentialSettings & Pick<Settings, 'MODEL_MAX_RESPONSE_BYTES' | 'SECRET_KEY'>;

export interface ProviderStatus {
  available: boolean;
  /** Why not, naming the setting or field to fill in. */
  reason?: string;
  /** The setting or record field that is missing. */
  missing?: string;
}

/** Calling a model whose provider lacks credentials (or does not exist); `missing` names the setting. */
export class ProviderUnavailableError extends HttpError {
  constructor(
    readonly provider: string,
    readonly reason: string,
    readonly missing?: string,
  ) {
    super(503, reason);
  }
}

interface SdkProvider {
  language(modelId: string): LanguageModel;
  embedding(modelId: string): EmbeddingModel;
}

const BUILTIN_KEYS = {
  openai: 'OPENAI_API_KEY',
  anthropic: 'ANTHROPIC_API_KEY',
  google: 'GOOGLE_GENERATIVE_AI_API_KEY',
} as const satisfies Record<string, keyof ProviderCredentialSettings>;

type BuiltinId = keyof typeof BUILTIN_KEYS;

/** The setting that holds a built-in provider's key (`openai`: OPENAI_API_KEY); undefined for any other name. */
export const builtinProviderKey = (name: string): keyof ProviderCredentialSettings | undefined => (isBuiltin(name) ? BUILTIN_KEYS[name] : undefined);

function isBuiltin(id: string): id is BuiltinId {
  return Object.hasOwn(BUILTIN_KEYS, id);
}

/** `headers`: the record's and Keel's own (ProviderRegistry.sentHeaders); `sdks`: Anthropic's and Google's packages, loaded by then (ProviderRegistry.ready). */
function create(record: ProviderRecord, headers: Record<string, string>, fetch: typeof globalThis.fetch, sdks: SdkLoader): SdkProvider {
  const common = {
    apiKey: record.api_key ?? undefined,
    baseURL: record.base_url ?? undefined,
    headers,
    fetch,
  };
  switch (record.kind) {
    case 'openai': {
      const p = createOpenAI(common);
      // Chat Completions, which every OpenAI-compatible endpoint speaks too.
      return { language: (id) => p.chat(id), embedding: (id) => p.embedding(id) };
    }
    case 'anthropic': {
      const p = sdks.get('anthropic').createAnthropic(common);
      return { language: (id) => p.languageModel(id), embedding: (id) => p.embeddingModel(id) };
    }
    case 'google': {
      const p = sdks.get('google').createGoogleGenerativeAI(common);
      return { language: (id) => p.chat(id), embedding: (id) => p.embedding(id) };
    }
    case 'openai-compatible': {
      const p = createOpenAICompatible({
        name: record.id,
        baseURL: record.base_url ?? '',
        apiKey: record.api_key ?? undefined,
        headers,
        fetch,
        includeUsage: true,
        // `response_format: json_schema` as OpenAI's API defines it (vLLM, Ollama, LiteLLM, OpenRouter speak it).
        supportsStructuredOutputs: true,
      });
      return { language: (id) => p.chatModel(id), embedding: (id) => p.embeddingModel(id) };
    }
  }
}

/** Provider records by id, as `ProviderRegistry.current` gives them. */
export type ProviderRecords = ReadonlyMap<string, ProviderRecord>;

/** A provider's wire (null: its kind speaks no OpenAI API), and whether its chat calls take it. */
interface ProviderWire {
  wire: OpenAIWire | null;
  chat: boolean;
}

/** Where the `openai` kind goes without a base URL or OPENAI_BASE_URL (the SDK's default too). */
const OPENAI_BASE_URL = 'https://api.openai.com/v1';

/** A header value shorter than this is taken for a word (`keel`, `v1`), not a credential. */
const MIN_SECRET_LENGTH = 8;

/** A header value as an HTTP authentication scheme and its credentials (`Bearer abc…`, `Basic dXNl…`): the credentials. */
const AUTH_SCHEME_VALUE = /^[A-Za-z][\w.+-]*[ \t]+(\S+)[ \t]*$/;

/** The headers whose value is `<scheme> <credentials>` (RFC 9110 §11.6). */
const AUTHENTICATION_HEADERS = new Set(['authorization', 'proxy-authorization']);

export class ProviderRegistry {
  private records: ProviderRecords = new Map<string, ProviderRecord>();
  private readonly clients = new Map<string, SdkProvider>();
  /**
   * Model objects by provider and model id: building one is costly (the openai-compatible chat
   * model compiles its response schemas: ~0.6 ms, measured), and they hold no per-call state.
   */
  private readonly languageModels = new Map<string, LanguageModel>();
  private readonly embeddingModels = new Map<string, EmbeddingModel>();
  private readonly wires = new Map<string, ProviderWire>();
  private dispatcher: Agent | undefined;
  /** Every SDK provider's fetch: the answer limit on what it reads. */
  private readonly fetch: typeof globalThis.fetch;
  /** What every request to a provider carries besides its record's headers: this deployment's hop mark (core/hop.ts). */
  private readonly ownHeaders: Record<string, string>;

  constructor(
    private readonly settings: ProviderSettings,
    records: readonly ProviderRecord[] = [],
    /** The SDK packages loaded on first use (provider-sdks.ts): the process's, unless a test gives its own. */
    readonly sdks: SdkLoader = providerSdks,
    /** Told why a package could not be loaded (the log): the caller is told only that its provider is unavailable. */
    private readonly onSdkLoadError: (error: unknown, providerId: string, kind: string) => void = () => undefined,
  ) {
    this.fetch = limitedFetch(settings.MODEL_MAX_RESPONSE_BYTES);
    this.ownHeaders = { [HOP_HEADER]: hopMark(settings.SECRET_KEY) };
    this.setRecords(records);
  }

  /** Replaces the provider records (call again after a change in the database). */
  setRecords(records: readonly ProviderRecord[]): void {
    this.records = new Map(records.map((r) => [r.id, r]));
    this.clients.clear();
    this.languageModels.clear();
    this.embeddingModels.clear();
    this.wires.clear();
  }

  /**
   * The provider records as they stand: a call's attempt keeps them to redact its error with
   * (`secrets`), since a change while it is in flight (a key rotated) replaces them.
   */
  get current(): ProviderRecords {
    return this.records;
  }

  /** The effective record of a provider: its record (in `records`), else the settings for a built-in one. */
  private resolve(id: string, records: ProviderRecords = this.records): ProviderRecord | undefined {
    const record = records.get(id);
    if (record) return record;
    if (id === 'openai') return { id, kind: 'openai', api_key: this.settings.OPENAI_API_KEY, base_url: this.settings.OPENAI_BASE_URL };
    if (id === 'anthropic') return { id, kind: 'anthropic', api_key: this.settings.ANTHROPIC_API_KEY };
    if (id === 'google') return { id, kind: 'google', api_key: this.settings.GOOGLE_GENERATIVE_AI_API_KEY };
    return undefined;
  }

  /**
   * What a provider is sent that no one else may read: its key and its headers' values (long
   * enough to be credentials rather than words), and of a value written `<scheme> <credentials>`
   * in an authentication header (a custom `Authorization: Bearer …`) the credentials alone too: a server that refuses a token
   * echoes the token, not the header. A server may echo them in an error. `records`: as they were
   * when a request was sent (`current`), for the credentials it went with. Longest first, so that
   * a value is redacted whole before the credentials inside it.
   */
  secrets(id: string, records?: ProviderRecords): string[] {
    const record = this.resolve(id, records);
    if (!record) return [];
    const values = Object.entries(record.headers ?? {}).flatMap(([name, value]) => {
      // Only an authentication header's value is a scheme and credentials: the second word of any
      // other (`X-Title: Acme Assistant`) would be redacted wherever an error said it.
      const credentials = AUTHENTICATION_HEADERS.has(name.toLowerCase()) ? AUTH_SCHEME_VALUE.exec(value)?.[1] : undefined;
      return credentials === undefined ? [value] : [value, credentials];
    });
    return [record.api_key, ...values].filter((value): value is string => typeof value === 'string' && value.length >= MIN_SECRET_LENGTH).sort((a, b) => b.length - a.length);
  }

  status(id: string): ProviderStatus {
    const record = this.resolve(id);
    if (!record) return { available: false, reason: `Provider ${id} is not configured`, missing: 'provider' };
    if (record.enabled === false) return { available: false, reason: `Provider ${id} is disabled` };
    // Not "has no api_key" (its record says it has one), nor called without headers it was given (their Authorization, say).
    const [unreadable, ...more] = record.unreadable ?? [];
    if (unreadable !== undefined) {
      const fields = [unreadable, ...more].join(' and ');
      return { available: false, reason: `Provider ${id}'s ${fields} cannot be opened (was SECRET_KEY changed?): set ${more.length || unreadable === 'headers' ? 'them' : 'it'} again`, missing: unreadable };
    }
    const fromSettings = !this.records.has(id) && isBuiltin(id);
    if (record.kind === 'openai-compatible') {
      if (!record.base_url) return { available: false, reason: `Provider ${id} has no base_url`, missing: 'base_url' };
      return { available: true }; // local servers (Ollama, vLLM) need no key
    }
    if (!record.api_key) {
      const missing = fromSettings ? BUILTIN_KEYS[id] : 'api_key';
      const reason = fromSettings ? `${missing} is not set` : `Provider ${id} has no api_key`;
      return { available: false, reason, missing };
    }
    return { available: true };
  }

  /**
   * The headers a provider is sent, on the SDK's paths and the wire alike: its record's, then Keel's
   * own, last so that nothing replaces them (a record cannot name them anyway: `x-keel-` is reserved).
   */
  private sentHeaders(record: ProviderRecord): Record<string, string> {
    return { ...record.headers, ...this.ownHeaders };
  }

  /**
   * A call's hop header when its request came with other deployments' marks (`hops`: core/hop.ts):
   * theirs, then this deployment's. Given with the call, it replaces the one every request carries.
   */
  hopHeaders(hops: readonly string[] | undefined): Record<string, string> | undefined {
    return hops?.length ? { [HOP_HEADER]: `${hops.join(',')},${this.ownHeaders[HOP_HEADER]}` } : undefined;
  }

  private client(id: string): SdkProvider {
    const status = this.status(id);
    if (!status.available) throw new ProviderUnavailableError(id, status.reason ?? 'unavailable', status.missing);
    let client = this.clients.get(id);
    if (!client) {
      const record = this.resolve(id) as ProviderRecord;
      client = create(record, this.sentHeaders(record), this.fetch, this.sdks);
      this.clients.set(id, client);
    }
    return client;
  }

  /**
   * Loads the SDK package of a provider whose kind has it loaded on first use (Anthropic, Google:
   * provider-sdks.ts), which its models, and checks of its calls, need; undefined when there is
   * nothing to wait for. A package that cannot be loaded makes the provider unavailable (503).
   */
  ready(providerId: string): Promise<void> | undefined {
    const kind = this.resolve(providerId)?.kind;
    if (!loadedOnUse(kind)) return undefined;
    return this.sdks.load(kind)?.catch((error: unknown) => {
      // The import's own words (paths of this machine) go to the log, not to the caller.
      this.onSdkLoadError(error, providerId, kind);
      const unavailable = new ProviderUnavailableError(providerId, `Provider ${providerId} is unavailable: the SDK package of its kind (${kind}) could not be loaded`);
      unavailable.cause = error;
      throw unavailable;
    });
  }

  languageModel(providerId: string, modelId: string): LanguageModel {
    return this.cached(this.languageModels, providerId, modelId, (client) => client.language(modelId));
  }

  /**
   * Chat Completions without the SDK for an `openai-compatible` provider (see openai-wire.ts), or
   * null for other kinds (their SDK models speak other APIs or add provider-specific fields).
   */
  chatWire(providerId: string): OpenAIWire | null {
    const { wire, chat } = this.wire(providerId);
    return chat ? wire : null;
  }

  /** Embeddings without the SDK for a provider that speaks OpenAI's API (`openai`, `openai-compatible`), else null. */
  embeddingsWire(providerId: string): OpenAIWire | null {
    return this.wire(providerId).wire;
  }

  /** The provider's OpenAI API over the wire, for the kinds that speak it (null for the others), and whether its chat goes over it too. */
  private wire(providerId: string): ProviderWire {
    let entry = this.wires.get(providerId);
    if (entry === undefined) {
      this.client(providerId); // the same availability check as the SDK's path
      const record = this.resolve(providerId) as ProviderRecord;
      const baseUrl = record.kind === 'openai-compatible' ? (record.base_url ?? '') : record.kind === 'openai' ? (record.base_url ?? this.settings.OPENAI_BASE_URL ?? OPENAI_BASE_URL) : undefined;
      const wire = baseUrl === undefined ? null : new OpenAIWire(baseUrl, record.api_key, this.sentHeaders(record), (this.dispatcher ??= wireDispatcher()));
      entry = { wire, chat: record.kind === 'openai-compatible' };
      this.wires.set(providerId, entry);
    }
    return entry;
  }

  /** A provider's kind (undefined: no such provider). */
  kind(providerId: string): ProviderKind | undefined {
    return this.resolve(providerId)?.kind;
  }

  /**
   * For a provider that speaks OpenAI's API (whose options a call may carry: strictness, reasoning
   * effort…), its kind and the key of `providerOptions` its SDK model reads: `openai`, or an
   * openai-compatible provider's name up to its first dot (the SDK's `providerOptionsName`).
   * Undefined for the other kinds.
   */
  openAIOptions(providerId: string): { kind: 'openai' | 'openai-compatible'; key: string } | undefined {
    const kind = this.resolve(providerId)?.kind;
    if (kind === 'openai') return { kind, key: 'openai' };
    return kind === 'openai-compatible' ? { kind, key: providerId.split('.')[0]!.trim() } : undefined;
  }

  /**
   * An embedding call's provider options, keyed as the provider's SDK model reads them: `dimensions`
   * and `user` for OpenAI-style providers, `dimensions` as Google's `outputDimensionality`. Null
   * when the provider cannot shorten its vectors and `dimensions` was asked for.
   */
  embeddingOptions(providerId: string, dimensions: number | undefined, user: string | undefined): Record<string, Record<string, JSONValue>> | undefined | null {
    if (dimensions === undefined && user === undefined) return undefined;
    const openAI = this.openAIOptions(providerId);
    if (openAI) return { [openAI.key]: { ...(dimensions !== undefined && { dimensions }), ...(user !== undefined && { user }) } };
    if (dimensions === undefined) return undefined; // `user`: OpenAI's alone
    return this.resolve(providerId)?.kind === 'google' ? { google: { outputDimensionality: dimensions } } : null;
  }

  /** Closes the wire's idle connections (the app's close hook). */
  async close(): Promise<void> {
    const dispatcher = this.dispatcher;
    this.dispatcher = undefined;
    this.wires.clear();
    await dispatcher?.close();
  }

  embeddingModel(providerId: string, modelId: string): EmbeddingModel {
    return this.cached(this.embeddingModels, providerId, modelId, (client) => client.embedding(modelId));
  }

  private cached<M>(models: Map<string, M>, providerId: string, modelId: string, make: (client: SdkProvider) => M): M {
    const key = `${providerId}\u0000${modelId}`;
    let model = models.get(key);
    if (model === undefined) {
      model = make(this.client(providerId));
      models.set(key, model);
    }
    return model;
  }
}
