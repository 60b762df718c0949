import { createHash, hash as oneShotHash, randomBytes } from 'node:crypto';

import { hash, verify } from '@node-rs/argon2';
import { errors as joseErrors, jwtVerify, SignJWT } from 'jose';

import type { Settings } from './config.js';

// ==================== Passwords ====================

// OWASP's Argon2id baseline (m=19 MiB, t=2, p=1). `2` is Argon2id (the enum is const, not importable here).
const ARGON2_OPTIONS = { algorithm: 2, memoryCost: 19_456, timeCost: 2, parallelism: 1 } as const;

export function hashPassword(password: string): Promise<string> {
  return hash(password, ARGON2_OPTIONS);
}

let dummyHash: Promise<string> | null = null;

/** Computes the dummy hash ahead, so that not even the first unknown-email login costs an extra hash. */
export async function prepareDummyHash(): Promise<void> {
  dummyHash ??= hashPassword(randomBytes(16).toString('hex'));
  await dummyHash;
}

/**
 * Checks a password against a stored hash. Without a hash (unknown account) it checks against a
 * dummy one, so that both answers take the same time and reveal nothing.
 */
export async function verifyPassword(password: string, hashed: string | null): Promise<boolean> {
  if (hashed === null) {
    dummyHash ??= hashPassword(randomBytes(16).toString('hex'));
    await verify(await dummyHash, password).catch(() => false);
    return false;
  }
  try {
    return await verify(hashed, password);
  } catch {
    return false;
  }
}

// ==================== Tokens ====================

export type TokenType = 'access' | 'reset';

export interface TokenClaims {
  /** The user id. */
  sub: string;
  /** The user's token_version when the token was issued. */
  ver: number;
  typ: TokenType;
  /** Expiry, seconds since the epoch. */
  exp: number;
  /** Reset tokens: a digest of the email they were mailed to (see emailBinding). */
  eml?: string;
}

/** Ties a reset token to the address it was mailed to: once the email changes, the link is dead. */
export function emailBinding(email: string): string {
  return createHash('sha256').update(email.toLowerCase()).digest('base64url').slice(0, 22);
}

const ALGORITHM = 'HS256';
/** User ids are UUIDs: a token naming anything else is invalid (401), not a malformed request. */
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const ISSUER = 'keel';

export class TokenService {
  private readonly key: Uint8Array;
  /** Verified tokens: skipping the signature check for a token already checked saves most of auth's CPU. */
  private readonly verified = new Map<string, TokenClaims>();
  private static readonly CACHE_SIZE = 10_000;

  constructor(private readonly settings: Pick<Settings, 'SECRET_KEY' | 'ACCESS_TOKEN_EXPIRE_MINUTES' | 'EMAIL_RESET_TOKEN_EXPIRE_HOURS'>) {
    // Separate keys per purpose, derived from the one secret.
    this.key = createHash('sha256').update(`keel:jwt:${settings.SECRET_KEY}`).digest();
  }

  async create(userId: string, version: number, type: TokenType, extra: { eml?: string } = {}): Promise<string> {
    const lifetimeSeconds =
      type === 'access'
        ? this.settings.ACCESS_TOKEN_EXPIRE_MINUTES * 60
        : this.settings.EMAIL_RESET_TOKEN_EXPIRE_HOURS * 3600;
    return new SignJWT({ ver: version, typ: type, ...extra })
      .setProtectedHeader({ alg: ALGORITHM, typ: 'JWT' })
      .setSubject(userId)
      .setIssuer(ISSUER)
      .setIssuedAt()
      .setJti(randomBytes(12).toString('base64url'))
      .setExpirationTime(Math.floor(Date.now() / 1000) + lifetimeSeconds)
      .sign(this.key);
  }

  /** The claims of a valid token of `type`, or null for anything else (forged, expired, other type). */
  async verify(token: string, type: TokenType): Promise<TokenClaims | null> {
    const nowSeconds = Date.now() / 1000;
    const cached = this.verified.get(token);
    if (cached) {
      if (cached.exp > nowSeconds && cached.typ === type) return cached;
      if (cached.exp <= nowSeconds) this.verified.delete(token);
      return null;
    }
    let claims: TokenClaims;
    try {
      const { payload } = await jwtVerify(token, this.key, { algorithms: [ALGORITHM], issuer: ISSUER, requiredClaims: ['exp', 'sub'] });
      if (typeof payload.ver !== 'number' || (payload.typ !== 'access' && payload.typ !== 'reset')) return null;
      if (!UUID.test(payload.sub!)) return null;
      claims = { sub: payload.sub as string, ver: payload.ver, typ: payload.typ, exp: payload.exp as number };
      if (typeof payload.eml === 'string') claims.eml = payload.eml;
    } catch (error) {
      if (error instanceof joseErrors.JOSEError) return null;
      throw error;
    }
    if (this.verified.size >= TokenService.CACHE_SIZE) {
      // Drop the oldest entry (Map keeps insertion order).
      const oldest = this.verified.keys().next();
      if (!oldest.done) this.verified.delete(oldest.value);
    }
    this.verified.set(token, claims);
    return claims.typ === type ? claims : null;
  }
}

// ==================== API keys ====================

export const API_KEY_PREFIX = 'keel_';

export function generateApiKey(): { key: string; prefix: string; hash: string } {
  const key = `${API_KEY_PREFIX}${randomBytes(32).toString('base64url')}`;
  return { key, prefix: key.slice(0, API_KEY_PREFIX.length + 6), hash: hashApiKey(key) };
}

/** Every API-key request hashes its key: the one-shot `crypto.hash` (Node ≥ 20.12) skips the Hash object. */
export function hashApiKey(key: string): string {
  return oneShotHash('sha256', key, 'hex');
}

export function looksLikeApiKey(credential: string): boolean {
  return credential.startsWith(API_KEY_PREFIX);
}
